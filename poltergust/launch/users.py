"""The node's pool of pipeline users (`--run-as USER --run-as-pool N`): one user per run or build at a time.

Two runs sharing a user could signal, trace or read each other's processes
and files; so every run and every environment build leases a user of its own
for as long as it lasts, and waits (saying so in its log) while all are taken.
Nothing of a lease outlives it: its processes end with their sandbox (see
`sandbox`), its working directory is removed and a build's files become
root's. The first free user (in the pool's order) is leased, so that
sequential runs keep finding the warm interpreter of the same user (see `warm`).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable

from poltergust.launch.sandbox import RunAs, RunAsError


def pool_users(user: str, size: int) -> list[str]:
    """The pool's user names: `user` alone, or `user-1` ... `user-N`."""
    if size < 1:
        raise RunAsError(f"--run-as-pool: must be at least 1 (got {size})")
    return [user] if size == 1 else [f"{user}-{slot}" for slot in range(1, size + 1)]


class UserPool:
    def __init__(self, users: list[RunAs]) -> None:
        uids = {user.uid for user in users}
        if len(uids) != len(users):
            raise RunAsError(f"--run-as: the pool's users must have distinct uids ({', '.join(u.user for u in users)})")
        self.users = list(users)
        self._free = list(self.users)
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def lookup(cls, user: str, size: int = 1) -> "UserPool":
        return cls([RunAs.lookup(name) for name in pool_users(user, size)])

    @property
    def first(self) -> RunAs:
        return self.users[0]

    @contextlib.asynccontextmanager
    async def lease(self, on_wait: Callable[[], None] | None = None) -> AsyncIterator[RunAs]:
        """A user no other run or build has until this ends; the first free one."""
        if not self._free and on_wait is not None:
            on_wait()
        while not self._free:
            freed = asyncio.get_running_loop().create_future()
            self._waiters.append(freed)
            try:
                await freed
            finally:
                self._waiters.remove(freed)
        user = min(self._free, key=self.users.index)
        self._free.remove(user)
        try:
            yield user
        finally:  # synchronous, so that even a cancelled run gives its user back
            self._free.append(user)
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
