"""The seed README's examples, as written there (only the package name changed
from ``db.session`` to ``sessionscope``), wired into one runnable script.

    python examples/seed_readme.py [DATABASE_URL]

The glue the README leaves to the reader (``some_condition``,
``some_database_function``, ``logger``) is defined here, outside the quoted code.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import List

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import (
    async_session_scope,
    async_with_retry,
    async_with_session,
    configure_session,
    get_session_stats,
    reset_session_stats,
    session_scope,
    setup_database_connection,
    with_session,
)

try:  # run as a script or imported as examples.seed_readme
    from models import Base, User, UserProfile  # type: ignore[import-not-found,no-redef]
except ImportError:
    from examples.models import Base, User, UserProfile

logger = logging.getLogger("seed_example")
some_condition = True


# -- 1. async mode: context manager ----------------------------------------------------
async def create_user_async_cm():
    async with async_session_scope() as session:
        user = User(name="张三")
        session.add(user)
        # 事务会自动提交


# -- 1. async mode: decorator ---------------------------------------------------------
@async_with_session()
async def create_user(session: AsyncSession, name: str):
    user = User(name=name)
    session.add(user)
    return user


# -- 2. sync mode: context manager -----------------------------------------------------
def create_user_sync_cm():
    with session_scope() as session:
        user = User(name="王五")
        session.add(user)
        # 事务会自动提交


# -- 2. sync mode: decorator -----------------------------------------------------------
@with_session()
def create_user_sync(session: Session, name: str):
    user = User(name=name)
    session.add(user)
    return user


# -- local configuration ----------------------------------------------------------------
async def local_configuration():
    async with async_session_scope(
        auto_commit=False,
        auto_rollback=True,
        enable_monitoring=False
    ) as session:
        # 数据库操作
        pass


@async_with_session(auto_commit=False)
async def some_function(session: AsyncSession):
    # 数据库操作
    pass


# -- exception handling -----------------------------------------------------------------
@async_with_session()
async def risky_operation(session: AsyncSession):
    try:
        # 一些可能失败的数据库操作
        user = User(name="测试用户")
        session.add(user)

        # 模拟异常
        if some_condition:
            raise ValueError("操作失败")

    except ValueError:
        # 异常会被重新抛出
        # 但事务已经自动回滚
        raise


# -- retry ------------------------------------------------------------------------------
async def some_database_function(arg1, arg2):
    return await create_user(f"{arg1}-{arg2}")


async def database_operation():
    # 这个操作会在失败时自动重试
    return await async_with_retry(
        some_database_function,
        "arg1", "arg2",
        max_retries=3,
        retry_delay=1.0
    )


# -- batch operations -------------------------------------------------------------------
@with_session()
def batch_create_users(session: Session, users_data: List[dict]):
    users = []
    for data in users_data:
        user = User(**data)
        users.append(user)

    session.add_all(users)
    return users


# -- best practices ---------------------------------------------------------------------
@async_with_session()
async def safe_operation(session: AsyncSession):
    try:
        # 数据库操作
        result = await session.execute(select(User))
        return result.scalars().all()
    except SQLAlchemyError as e:
        logger.error(f"数据库操作失败: {e}")
        # 异常会自动触发回滚
        raise


# 对于只读操作，可以禁用自动提交
@async_with_session(auto_commit=False)
async def read_only_operation(session: AsyncSession):
    result = await session.execute(select(User).limit(100))
    return result.scalars().all()


# -- nested transactions ----------------------------------------------------------------
async def complex_operation():
    async with async_session_scope() as session:
        # 外层事务
        user = User(name="用户1")
        session.add(user)

        # 内层操作（使用同一个session）
        await create_user_profile(session, user.id)

        # 整个操作作为一个事务提交


async def create_user_profile(session: AsyncSession, user_id: int):
    profile = UserProfile(user_id=user_id, bio="用户简介")
    session.add(profile)


# -- monitoring decorator ---------------------------------------------------------------
@async_with_session(enable_monitoring=True)
async def monitored_operation(session: AsyncSession):
    # 这个操作会被详细监控
    pass


# -- the design document's interface examples ------------------------------------------
@async_with_session
async def create_user_bare(session: AsyncSession, name: str):
    user = User(name=name)
    session.add(user)
    return user


@with_session
def create_user_sync_bare(session: Session, name: str):
    user = User(name=name)
    session.add(user)
    return user


async def design_doc_async():
    async with async_session_scope() as session:
        # 数据库操作
        result = await session.execute(select(User))
        await session.commit()


def design_doc_sync():
    with session_scope() as session:
        # 数据库操作
        result = session.execute(select(User))
        session.commit()


def print_stats():
    stats = get_session_stats()
    print(f"总session数: {stats['session_count']}")
    print(f"活跃session数: {stats['active_sessions']}")
    print(f"总事务数: {stats['total_transactions']}")
    print(f"失败事务数: {stats['failed_transactions']}")
    print(f"成功率: {stats['success_rate']:.2f}%")
    if stats['active_sessions'] > 10:
        logger.warning("活跃session数量过多")


async def run_async_examples() -> list[str]:
    await create_user_async_cm()
    user = await create_user("李四")
    assert user.id and user.name == "李四"
    await local_configuration()
    await some_function()
    try:
        await risky_operation()
    except ValueError:
        pass
    await database_operation()
    await complex_operation()
    await monitored_operation()
    await create_user_bare("bare")
    await design_doc_async()
    assert len(await read_only_operation()) == len(await safe_operation())
    names = sorted(u.name for u in await safe_operation())
    from sessionscope import get_default_manager

    await get_default_manager().adispose()
    return names


def main(url: str | None = None) -> list[str]:
    """Run every example; return the committed user names (for the tests)."""
    configure_session(
        auto_commit=True,        # 是否自动提交
        auto_rollback=True,      # 是否自动回滚
        enable_monitoring=True,  # 是否启用监控
        log_level="INFO",        # 日志级别
        retry_attempts=3,        # 重试次数
        retry_delay=1.0         # 重试延迟（秒）
    )
    manager = setup_database_connection(url)
    Base.metadata.drop_all(manager.engine)
    Base.metadata.create_all(manager.engine)
    reset_session_stats()

    create_user_sync_cm()
    user = create_user_sync("赵六")
    assert user.id and user.name == "赵六"
    batch_create_users([{"name": "批量1"}, {"name": "批量2"}])
    create_user_sync_bare("sync-bare")
    design_doc_sync()
    names = asyncio.run(run_async_examples())
    print_stats()
    manager.dispose()
    return names


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else None))
