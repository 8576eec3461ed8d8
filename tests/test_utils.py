from utils import batched


def test_batched_keeps_every_item_in_order():
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    assert list(batched("ab", 2)) == [["a", "b"]]
