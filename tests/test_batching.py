from scheduler.batching import BACKGROUND, URGENT, Pending, expired, next_batch


def p(key: int, role: str = "embed", priority: int = BACKGROUND, enqueued: float = 0.0, remaining: int = 4,
      group: object = (), deadline: float | None = None) -> Pending:
    return Pending(key, role, group, priority, enqueued, remaining, deadline)


def test_urgent_heads_the_batch_even_when_younger() -> None:
    plan = next_batch([p(1, enqueued=0.0), p(2, priority=URGENT, enqueued=5.0)], max_items=100)
    assert plan[0] == (2, 4)


def test_same_role_requests_share_a_batch_up_to_the_cap() -> None:
    plan = next_batch([p(1, remaining=5), p(2, remaining=5, enqueued=1), p(3, remaining=5, enqueued=2)], max_items=12)
    assert plan == [(1, 5), (2, 5), (3, 2)]


def test_other_roles_and_groups_wait() -> None:
    pending = [p(1, role="rerank"), p(2, role="embed", enqueued=1), p(3, role="rerank", group=("x",), enqueued=2)]
    assert next_batch(pending, max_items=100) == [(1, 4)]


def test_expired() -> None:
    assert expired([p(1, deadline=1.0), p(2, deadline=3.0), p(3)], now=2.0) == [1]
