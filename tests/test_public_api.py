from __future__ import annotations

import asgi_perfmon


def test_all_lists_exactly_the_public_names() -> None:
    """``__all__`` is sorted and names every public attribute, and nothing else."""
    public = sorted(
        name
        for name, value in vars(asgi_perfmon).items()
        if (
            not name.startswith("_") and getattr(value, "__module__", "").startswith("asgi_perfmon")
        )
        or name == "__version__"
    )
    expected = sorted(public)

    assert expected == sorted(asgi_perfmon.__all__)
    assert list(asgi_perfmon.__all__) == sorted(asgi_perfmon.__all__)


def test_every_name_in_all_is_importable() -> None:
    """``from asgi_perfmon import *`` gives every documented name."""
    namespace: dict[str, object] = {}
    exec("from asgi_perfmon import *", namespace)

    assert set(asgi_perfmon.__all__) - {"__version__"} <= set(namespace)


def test_package_is_typed() -> None:
    """The package ships the PEP 561 marker."""
    from importlib.resources import files

    assert files("asgi_perfmon").joinpath("py.typed").is_file()
