from scheduler.phases import RoleLoad, rank_roles


def load(role: str, urgent: int = 0, background: int = 0, u_age: float = 0.0, b_age: float = 0.0,
         resident: bool = False, swap: float = 1.5) -> RoleLoad:
    return RoleLoad(role, urgent, background, u_age, b_age, resident, 0.0 if resident else swap)


def test_urgent_work_comes_first_oldest_first() -> None:
    loads = [load("embed", background=500, b_age=20, resident=True), load("rerank", urgent=1, u_age=0.1),
             load("generate", urgent=1, u_age=0.5)]
    assert rank_roles(loads)[:2] == ["generate", "rerank"]


def test_resident_backlog_is_drained_before_paying_for_a_swap() -> None:
    loads = [load("embed", background=64, b_age=1.0, resident=True), load("generate", background=64, b_age=1.0)]
    assert rank_roles(loads)[0] == "embed"


def test_a_much_larger_or_older_backlog_is_worth_a_swap() -> None:
    loads = [load("embed", background=4, b_age=0.1, resident=True), load("generate", background=400, b_age=8.0)]
    assert rank_roles(loads)[0] == "generate"


def test_no_background_role_starves() -> None:
    loads = [load("embed", background=10_000, b_age=1.0, resident=True),
             load("rerank", background=1, b_age=31.0, swap=30.0)]
    assert rank_roles(loads, starvation_s=30.0)[0] == "rerank"
