"""The shard plan on its own: committed once, read back, compared with a changed input."""

from __future__ import annotations

from lnstd import storage
from lnstd.data import Item, Source
from lnstd.output import Output
from lnstd.plan import Plan, _digest


class Listed(Source):
    """A source that lists fixed items (ids unique by construction, like a folder)."""

    unique_ids = True

    def __init__(self, names: list[str]) -> None:
        super().__init__("mem://listing", storage.StorageOptions())
        self.names = names

    def items(self):
        return iter(Item(n, f"/data/{n}") for n in self.names)


def test_refresh_adds_exactly_the_new_inputs_whatever_their_id_digest(tmp_path):
    """An id whose 16-byte digest ends in a zero byte (1 in 256 of them) is still found in the plan:
    NumPy's fixed-width bytes drop trailing zero bytes when an element is read back."""
    names = [f"img{k}.png" for k in range(300)]
    assert sum(_digest(n).endswith(b"\x00") for n in names) >= 1  # img60.png among them
    plan = Plan.create(Output(str(tmp_path / "out")), Listed(names), 7)
    assert plan.inputs == 300 and plan.shards == 43
    diff = plan.diff(Listed(names), keep_added=True)
    assert (diff.added, diff.removed, diff.added_items) == (0, 0, [])
    changed = Listed([*names[2:], "new-a.png", "new-b.png"])
    diff = plan.diff(changed, keep_added=True)
    assert (diff.added, diff.removed) == (2, 2)
    assert [it.image_id for it in diff.added_items] == ["new-a.png", "new-b.png"]
    assert plan.extend(diff.added_items) == [43]
    reread = Plan.load(Output(str(tmp_path / "out")))
    ids = [it.image_id for s in range(reread.shards) for it in reread.read_shard(s)]
    assert ids == [*names, "new-a.png", "new-b.png"] and reread.shards == 44


def test_one_image_shards_keep_each_plan_part_small_for_the_actor_that_reads_one_shard(tmp_path):
    """An actor reads its shard from one plan part: the part's footer (24 bytes per shard in it) and
    one record batch. With --shard-size 1 a part held up to a million shards, so every one-image
    shard cost its actor a 24 MB footer read; parts now hold at most PART_SHARDS shards."""
    import struct

    from lnstd.plan import PART_SHARDS

    n = 2 * PART_SHARDS + 5
    names = [f"i{k:05d}.png" for k in range(n)]
    out = Output(str(tmp_path / "out"))
    plan = Plan.create(out, Listed(names), 1)
    assert (plan.inputs, plan.shards) == (n, n)
    parts = sorted((tmp_path / "out" / "_lnstd" / "plan").glob("part-*.arrow"))
    assert len(parts) == 3
    for p in parts:
        data = p.read_bytes()
        assert data[-6:] == b"ARROW1"
        footer = struct.unpack("<i", data[-10:-6])[0]  # the IPC file's footer length
        assert footer < 24 * PART_SHARDS + 4096, (p.name, footer)
    for s in (0, PART_SHARDS - 1, PART_SHARDS, 2 * PART_SHARDS, n - 1):  # each part's ends
        assert [it.image_id for it in plan.read_shard(s)] == [names[s]]
        assert plan.shard_inputs(s) == 1
