import numpy as np
import pytest

from pipeline.data.dataset import load_windows
from pipeline.data.records import find_records
from pipeline.data.segments import segment
from pipeline.data.split import stratified_split
from pipeline.errors import ConfigError, DataError


def test_split_is_a_stratified_seeded_partition():
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 7
    split = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    all_idx = np.concatenate(list(split.values()))
    assert sorted(all_idx.tolist()) == list(range(len(labels)))  # disjoint and complete
    labels = np.array(labels)
    for c, n in (("a", 20), ("b", 10)):
        assert (labels[split["test"]] == c).sum() == round(n * 0.2)
    again = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    other = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], other["test"])


def test_split_refuses_bad_fractions_and_tiny_classes():
    with pytest.raises(ConfigError, match=r"data.test_fraction=1.5 must be in \[0, 1\)"):
        stratified_split(["a", "b"], val_fraction=0.1, test_fraction=1.5, seed=0)
    with pytest.raises(ConfigError, match="must be below 1"):
        stratified_split(["a", "b"], val_fraction=0.5, test_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="class 'b' has 1 recording"):
        stratified_split(["a"] * 5 + ["b"], val_fraction=0.2, test_fraction=0.2, seed=0)


def test_segment_windows_hop_and_padding():
    x = np.arange(10, dtype=np.float32)[None]
    w = segment(x, length=4, hop=2, pad=False)
    assert w.shape == (4, 1, 4)
    np.testing.assert_array_equal(w[1, 0], [2, 3, 4, 5])
    assert segment(x[:, :3], length=4, hop=4, pad=False).shape == (0, 1, 4)
    np.testing.assert_array_equal(segment(x[:, :3], length=4, hop=4, pad=True)[0, 0], [0, 1, 2, 0])
    padded = segment(x, length=4, hop=4, pad=True)  # tail of 2 samples is half a window: kept
    assert padded.shape == (3, 1, 4)
    np.testing.assert_array_equal(padded[2, 0], [8, 9, 0, 0])


def test_records_and_windows_skip_broken_files(tone_dataset):
    (tone_dataset / "low" / "broken.wav").write_bytes(b"not audio")
    (tone_dataset / "notes.txt").write_text("ignored: not in a class folder")
    records = find_records(tone_dataset)
    assert sorted({r.label for r in records}) == ["high", "low", "mid"]
    assert len(records) == 19
    windows = load_windows(
        records,
        sample_rate=1000,
        channels="mix",
        length_seconds=0.2,
        hop_seconds=0.1,
        pad=False,
        progress=False,
    )
    assert [s.path.name for s in windows.skipped] == ["broken.wav"]
    assert windows.x.shape[1:] == (1, 200) and windows.length == 200 and windows.hop == 100
    assert len(windows.x) == 18 * 4  # 500 samples: starts 0, 100, 200, 300
    assert windows.x.shape[0] == windows.record.shape[0] == windows.start.shape[0]


def test_records_need_a_folder_with_two_classes(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        find_records(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.npy").write_bytes(b"")
    with pytest.raises(DataError, match="at least two class subfolders"):
        find_records(tmp_path)
