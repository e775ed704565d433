"""The example service built to the performance guidelines, and ``make demo`` around it.

See ``example_app/README.md`` for the guideline-to-code map.
"""
