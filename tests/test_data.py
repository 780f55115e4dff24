import itertools
import os

import numpy as np
import pytest
import scipy.io
import soundfile as sf

from pipeline.data.dataset import FileWindows, Skipped, iter_windows, time_regions
from pipeline.data.records import find_records
from pipeline.data.segments import segment
from pipeline.data.split import split_records, stratified_split
from pipeline.errors import ConfigError, DataError, config_keys
from pipeline.features.stft import STFTParams
from pipeline.frontend import Frontend, segmenting

# Reading and cutting need no image; any valid settings do.
PARAMS = STFTParams(n_fft=64, hop_length=16, win_length=64)


def tone(path, freq, n=500, rate=1000):
    t = np.arange(n) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, subtype="FLOAT")


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
    with pytest.raises(ConfigError, match=r"^test_fraction=1.5 must be in \[0, 1\)"):
        stratified_split(["a", "b"], val_fraction=0.1, test_fraction=1.5, seed=0)
    with pytest.raises(ConfigError, match=r"^val_fraction \+ test_fraction = 1.0 must be below 1"):
        stratified_split(["a", "b"], val_fraction=0.5, test_fraction=0.5, seed=0)
    # The task layer names the config keys (compare wraps split_records so).
    full = r"^data.val_fraction \+ data.test_fraction = 1.0 must be below 1"
    with pytest.raises(ConfigError, match=full), config_keys("data."):
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


# -- layouts -------------------------------------------------------------------------------


def test_class_folders_ignore_unknown_suffixes_and_loose_files(tone_dataset):
    (tone_dataset / "low" / "notes.pdf").write_text("x")
    (tone_dataset / "readme.wav").write_bytes(b"")  # not inside a class folder
    found = find_records(tone_dataset)
    assert found.layout == "class_folders" and found.classes == ["high", "low", "mid"]
    assert len(found.records) == 18
    assert found.ignored == {"suffix '.pdf' not supported": 1, "not inside a class folder": 1}


def test_looping_broken_and_folder_symlinks_are_counted_in_ignored(tone_dataset):
    low = tone_dataset / "low"
    os.symlink(sorted(low.glob("*.wav"))[0], tone_dataset / "mid" / "linked.wav")  # read as is
    os.symlink(low / "b.wav", low / "a.wav")  # a -> b -> a
    os.symlink(low / "a.wav", low / "b.wav")
    os.symlink(low / "gone.wav", low / "dangling.wav")
    os.symlink(low, low / "self")  # a link to its own folder: walking it would never end
    os.mkfifo(low / "pipe.wav")  # reading it would block
    found = find_records(tone_dataset)
    assert len(found.records) == 19  # 18 files and the link to one of them
    assert found.ignored == {
        "symbolic link loop (the link leads back to itself); remove the link": 2,
        "broken symbolic link (its target does not exist); remove or fix the link": 1,
        "symbolic link to a folder (not followed); move or copy the folder under data.root, "
        "or link its files": 1,
        "not a regular file (a pipe, socket or device)": 1,
    }


def test_split_folders_are_a_predefined_split(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, f in (("a", 50), ("b", 150)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                tone(tmp_path / split / c / f"{i}.wav", f)
    found = find_records(tmp_path)
    assert found.layout == "split_folders"
    splits = split_records(
        found.records, strategy="auto", val_fraction=0.0, test_fraction=0.2, seed=0
    )
    assert (splits == "test").sum() == 4 and (splits == "train").sum() == 6
    assert all(s == r.split for s, r in zip(splits, found.records, strict=True))


def test_labels_and_groups_from_file_names(tmp_path):
    for digit, speaker, i in itertools.product("017", ("jackson", "theo"), range(3)):
        tone(tmp_path / f"{digit}_{speaker}_{i}.wav", 100 + 50 * int(digit))
    found = find_records(tmp_path, label_regex=r"^(\d+)_", group_regex=r"^\d+_([a-z]+)_")
    assert found.classes == ["0", "1", "7"] and found.layout == "label_regex"
    assert {r.group for r in found.records} == {"jackson", "theo"}
    with pytest.raises(DataError, match=r"data.label_regex='\^\(x\)' matched none"):
        find_records(tmp_path, label_regex="^(x)")
    with pytest.raises(ConfigError, match="has no capture group"):
        find_records(tmp_path, label_regex=r"^\d+_")


def test_manifest_with_split_and_group(tmp_path):
    rows = ["path,label,split,group"]
    for i in range(8):
        tone(tmp_path / f"f{i}.wav", 50 + 100 * (i % 2))
        rows.append(f"f{i}.wav,{'ab'[i % 2]},{'test' if i >= 6 else 'train'},m{i // 4}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    found = find_records(tmp_path / "elsewhere", manifest=tmp_path / "list.csv")
    assert found.layout == "manifest" and found.classes == ["a", "b"]
    assert [r.split for r in found.records].count("test") == 2
    assert {r.group for r in found.records} == {"m0", "m1"}
    (tmp_path / "twice.csv").write_text(
        "path,label,split\nf0.wav,a,train\nf1.wav,b,\nf0.wav,a,test\n"
    )
    with pytest.raises(DataError, match=r"f0.wav is listed twice \(rows 2 and 4\)"):
        find_records(tmp_path, manifest=tmp_path / "twice.csv")
    (tmp_path / "bad.csv").write_text("file,class\nf0.wav,a\n")
    with pytest.raises(DataError, match=r"has columns \['file', 'class'\]; it needs 'path'"):
        find_records(tmp_path, manifest=tmp_path / "bad.csv")


# -- split strategies: no source sample in two splits -----------------------------------------


def windows_by_split(records, splits, *, length, hop, val=0.2, test=0.2):
    seg = segmenting(
        sample_rate=1000, length_seconds=length / 1000, hop_seconds=hop / 1000, pad=False
    )
    front = Frontend(sample_rate=1000, segmenting=seg, params=PARAMS, read={"channels": "mix"})
    items = list(
        iter_windows(records, splits, front, val_fraction=val, test_fraction=test, progress=False)
    )
    covered: dict[str, set] = {"train": set(), "val": set(), "test": set()}
    for item in items:
        assert isinstance(item, FileWindows)
        for start, name in zip(item.start, item.split, strict=True):
            covered[name] |= {
                (str(records[item.index].path), s) for s in range(start, start + length)
            }
    return covered


@pytest.mark.parametrize("strategy", ["random", "group", "regex", "time"])
def test_no_source_sample_lands_in_two_splits(tmp_path, strategy):
    for digit, speaker, i in itertools.product("01", ("ann", "bob", "cy", "dee"), range(4)):
        tone(tmp_path / f"{digit}_{speaker}_{i}.wav", 100 + 200 * int(digit), n=2000)
    found = find_records(tmp_path, label_regex=r"^(\d)_", group_regex=r"^\d_([a-z]+)_")
    splits = split_records(
        found.records,
        strategy=strategy,
        val_fraction=0.2,
        test_fraction=0.25,
        seed=1,
        test_regex=r"_3\.wav$",
        test_groups=None,
    )
    covered = windows_by_split(found.records, splits, length=200, hop=100)
    assert all(covered[s] for s in ("train", "test"))
    for a, b in itertools.combinations(covered, 2):
        assert not covered[a] & covered[b], (a, b)
    if strategy == "group":
        groups = {
            s: {r.group for r, x in zip(found.records, splits, strict=True) if x == s}
            for s in ("train", "val", "test")
        }
        assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    if strategy != "time":  # a file's windows never straddle splits
        files = {s: {p for p, _ in covered[s]} for s in covered}
        assert not files["train"] & files["test"]


def test_group_split_holds_out_named_groups(tmp_path):
    for digit, speaker in itertools.product("01", ("ann", "bob", "cy")):
        tone(tmp_path / f"{digit}_{speaker}_0.wav", 100)
    found = find_records(tmp_path, label_regex=r"^(\d)_", group_regex=r"^\d_([a-z]+)_")
    splits = split_records(
        found.records,
        strategy="group",
        val_fraction=0.3,
        test_fraction=0.2,
        seed=0,
        test_groups=["cy"],
    )
    assert {r.group for r, s in zip(found.records, splits, strict=True) if s == "test"} == {"cy"}
    with pytest.raises(DataError, match=r"\['zed'\] not among the groups \['ann', 'bob', 'cy'\]"):
        split_records(
            found.records,
            strategy="group",
            val_fraction=0,
            test_fraction=0.2,
            seed=0,
            test_groups=["zed"],
        )


def test_group_split_takes_named_validation_groups_or_none(tmp_path):
    for digit, speaker in itertools.product("01", ("ann", "bob", "cy", "dee")):
        tone(tmp_path / f"{digit}_{speaker}_0.wav", 100)
    found = find_records(tmp_path, label_regex=r"^(\d)_", group_regex=r"^\d_([a-z]+)_")

    def groups_of(splits):
        out = {}
        for r, s in zip(found.records, splits, strict=True):
            out.setdefault(s, set()).add(r.group)
        return out

    common = dict(strategy="group", test_fraction=0.2, seed=0, test_groups=["cy"])
    named = split_records(found.records, val_fraction=0.3, val_groups=["ann"], **common)
    assert groups_of(named) == {"test": {"cy"}, "val": {"ann"}, "train": {"bob", "dee"}}
    # No validation at all: every remaining group trains (the last epoch is kept).
    none = split_records(found.records, val_fraction=0, **common)
    assert groups_of(none) == {"test": {"cy"}, "train": {"ann", "bob", "dee"}}
    with pytest.raises(DataError, match=r"^val_groups=\['cy'\]: \['cy'\] not among the"):
        split_records(found.records, val_fraction=0.3, val_groups=["cy"], **common)
    with pytest.raises(DataError, match=r"^data.val_groups=\['cy'\]: "), config_keys("data."):
        split_records(found.records, val_fraction=0.3, val_groups=["cy"], **common)
    with pytest.raises(DataError, match="leaves no group for training"):
        split_records(found.records, val_fraction=0.3, val_groups=["ann", "bob", "dee"], **common)


def test_time_regions_leave_a_window_gap():
    r = time_regions(1000, length=50, val_fraction=0.1, test_fraction=0.2)
    assert r == {"train": (0, 600), "val": (650, 750), "test": (800, 1000)}
    no_val = time_regions(1000, length=50, val_fraction=0.0, test_fraction=0.2)
    assert no_val["train"] == (0, 750) and no_val["test"] == (800, 1000)


def test_long_multichannel_mat_recordings_split_by_time(tmp_path):
    rng = np.random.default_rng(0)
    for label, f in (("inner", 120.0), ("outer", 300.0)):
        t = np.arange(20_000) / 1000
        x = np.stack(
            [np.sin(2 * np.pi * f * t), rng.standard_normal(t.size)], axis=1
        )  # (samples, 2)
        (tmp_path / label).mkdir()
        scipy.io.savemat(tmp_path / label / "rec.mat", {"X_DE_time": x, "X_RPM": 1797})
    found = find_records(tmp_path)
    splits = split_records(
        found.records, strategy="time", val_fraction=0.1, test_fraction=0.2, seed=0
    )
    seg = segmenting(sample_rate=1000, length_seconds=0.5, hop_seconds=0.25, pad=False)
    read = {"channels": "all", "mat_key": "DE_time"}
    front = Frontend(sample_rate=1000, segmenting=seg, params=PARAMS, read=read)
    items = list(
        iter_windows(
            found.records, splits, front, val_fraction=0.1, test_fraction=0.2, progress=False
        )
    )
    for item in items:
        assert item.x.shape[1:] == (2, 500)
        ranges = {
            s: [(a, a + 500) for a, n in zip(item.start, item.split, strict=True) if n == s]
            for s in ("train", "val", "test")
        }
        assert max(b for _, b in ranges["train"]) <= min(a for a, _ in ranges["val"])
        assert max(b for _, b in ranges["val"]) <= min(a for a, _ in ranges["test"])
        assert min(a for a, _ in ranges["test"]) >= 16_000


def test_broken_short_and_odd_files_are_skipped_with_reasons(tone_dataset):
    (tone_dataset / "low" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    (tone_dataset / "low" / "silent.wav").write_bytes(b"")
    sf.write(tone_dataset / "mid" / "short.wav", np.full(50, 0.1, np.float32), 1000)
    sf.write(tone_dataset / "mid" / "stereo.wav", np.full((500, 2), 0.1, np.float32), 1000)
    np.save(tone_dataset / "high" / "nan.npy", np.array([0.0, np.nan] * 300))
    found = find_records(tone_dataset)
    splits = np.full(len(found.records), "train")
    seg = segmenting(sample_rate=1000, length_seconds=0.2, hop_seconds=0.1, pad=False)
    front = Frontend(sample_rate=1000, segmenting=seg, params=PARAMS, read={"channels": "all"})
    items = list(iter_windows(found.records, splits, front, progress=False))
    skipped = {s.path.name: s.reason for s in items if isinstance(s, Skipped)}
    assert set(skipped) == {"broken.wav", "silent.wav", "short.wav", "stereo.wav", "nan.npy"}
    assert (
        "shorter than one window of 200 samples; set data.segment.pad=true" in skipped["short.wav"]
    )
    assert "has 2 channel(s)" in skipped["stereo.wav"]
    assert "NaN" in skipped["nan.npy"]
    assert sum(len(i.x) for i in items if isinstance(i, FileWindows)) == 18 * 4
    # read ahead by two worker processes (data.workers): the same files, windows and reasons
    ahead = list(iter_windows(found.records, splits, front, progress=False, workers=2))
    assert [type(i) for i in ahead] == [type(i) for i in items]
    for a, b in zip(items, ahead, strict=True):
        if isinstance(a, Skipped):
            assert a == b
        else:
            assert a.index == b.index and np.array_equal(a.x, b.x)


def test_records_need_a_folder_with_two_classes(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        find_records(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.npy").write_bytes(b"")
    with pytest.raises(DataError, match="at least two classes"):
        find_records(tmp_path)
