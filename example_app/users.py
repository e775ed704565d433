"""Users: the API models and the service, with an in-memory cache invalidated on writes."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from asgi_perfmon import timed
from asgi_perfmon.cache import cached
from asgi_perfmon.pool import InstrumentedPool
from example_app import database
from example_app.settings import Settings

EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


class UserNotFound(LookupError):
    """No user has this id."""


class EmailTaken(ValueError):
    """Another user has this email."""


class UserUpdate(BaseModel):
    """The fields of a user that can change."""

    name: str = Field(min_length=1, max_length=100)
    email: str = Field(max_length=254, pattern=EMAIL_PATTERN)


class UserCreate(UserUpdate):
    """A new user."""

    password: str = Field(min_length=8, max_length=128)


class User(BaseModel):
    """A user as the API returns it (cached instances are shared, hence frozen)."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    email: str
    created_at: datetime
    updated_at: datetime


class UserPage(BaseModel):
    """One page of users; pass ``next_after`` as ``after`` for the next page."""

    items: list[User]
    next_after: int | None


@timed("users.hash_password")
def hash_password(password: str, iterations: int) -> str:
    """A salted PBKDF2 hash: deliberately CPU-heavy, so it runs in a worker thread."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


class UserService:
    """Reads go through the ``users`` cache; updates and deletes invalidate the entry."""

    def __init__(self, pool: InstrumentedPool, settings: Settings) -> None:
        self._pool = pool
        self._iterations = settings.password_iterations
        self.get = cached("users", maxsize=settings.user_cache_size, ttl=settings.user_cache_ttl_s)(
            self._load
        )

    @timed("users.load")
    async def _load(self, user_id: int) -> User:
        record = await database.select_user(self._pool, user_id)
        if record is None:
            raise UserNotFound(user_id)  # not cached: a user created later is found
        return User(**record)

    async def create(self, new: UserCreate) -> User:
        password_hash = await asyncio.to_thread(hash_password, new.password, self._iterations)
        try:
            record = await database.insert_user(self._pool, new.name, new.email, password_hash)
        except asyncpg.UniqueViolationError:
            raise EmailTaken(new.email) from None
        return User(**record)

    async def update(self, user_id: int, change: UserUpdate) -> User:
        try:
            record = await database.update_user(self._pool, user_id, change.name, change.email)
        except asyncpg.UniqueViolationError:
            raise EmailTaken(change.email) from None
        self.get.invalidate(user_id)
        if record is None:
            raise UserNotFound(user_id)
        return User(**record)

    async def delete(self, user_id: int) -> None:
        deleted = await database.delete_user(self._pool, user_id)
        self.get.invalidate(user_id)
        if not deleted:
            raise UserNotFound(user_id)

    async def page(self, after: int, limit: int) -> UserPage:
        records = await database.select_users_page(self._pool, after, limit)
        items = [User(**record) for record in records]
        next_after = items[-1].id if len(items) == limit else None
        return UserPage(items=items, next_after=next_after)
