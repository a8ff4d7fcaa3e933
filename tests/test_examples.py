"""The seed README's examples run as written on every backend."""

from __future__ import annotations

import pytest
from sqlalchemy import select

import sessionscope
from examples import seed_readme
from examples.models import User, UserProfile


def test_seed_readme_examples(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    names = seed_readme.main(db_url)
    assert names == sorted(
        ["张三", "李四", "王五", "赵六", "批量1", "批量2", "arg1-arg2", "用户1", "bare",
         "sync-bare"]
    )
    out = capsys.readouterr().out
    assert "成功率: 94.12%" in out  # 16 of 17 transactions committed: risky_operation failed
    manager = sessionscope.get_default_manager()
    with manager.session_scope() as s:
        profile = s.scalars(select(UserProfile)).one()
        owner = s.get(User, profile.user_id)
        assert owner is not None and owner.name == "用户1"
        assert s.scalar(select(User).where(User.name == "测试用户")) is None
    manager.dispose()
