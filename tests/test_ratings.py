"""The ratings CSV: every faulty row reported by its spreadsheet row number, good rows still usable."""

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.ratings import (
    COLUMNS, MAX_ARCHIVE_BYTES, MAX_ARCHIVE_FILES, Ratings, RatingsConfig, RatingsFileError, RowError, read_ratings,
    unpack_ratings_archive, write_ratings,
)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(path)
    return path


@pytest.fixture
def study(tmp_path):
    """A data root with good images, a truncated one, and an image just outside it, plus a symlink to that."""
    root = tmp_path / "study"
    for name in ("ct", "mr", "xr"):
        _png(root / "images" / f"{name}.png")
    whole = _png(root / "images" / "broken.png").read_bytes()
    (root / "images" / "broken.png").write_bytes(whole[: len(whole) // 2])
    outside = _png(tmp_path / "outside.png")
    (root / "images" / "link.png").symlink_to(outside)
    return root


def test_every_fault_is_reported_by_row_and_column_and_good_rows_load(study, tmp_path):
    outside = tmp_path / "outside.png"
    lines = [
        "\ufeff Image_Path ,RATING,modality,expert_level,prompt,notes",  # 1: BOM, odd case, an extra column
        "images/ct.png,2,CT,1,CT: liver,first",  # 2: good
        "images/mr.png,3,mr,2.0, MRI: brain ,",  # 3: good: alias, 2.0, prompt stripped
        "../outside.png,2,CT,1,CT: x,",  # 4
        f"{outside},2,CT,1,CT: x,",  # 5
        "images/link.png,2,CT,1,CT: x,",  # 6: symlink out of the root
        "images/ct.png,5,CT,1,CT: x,",  # 7
        "images/ct.png,abc,CT,1,CT: x,",  # 8
        "images/ct.png,2,CT,4,CT: x,",  # 9
        "images/ct.png,2,CT,1,   ,",  # 10
        '"images/ct.png",2,"PET: x",1,PET: x,',  # 11: the prompt pasted into the modality column (any name is a modality)
        "images/nope.png,2,CT,1,CT: x,",  # 12
        "images/broken.png,2,CT,1,CT: x,",  # 13
        "images/ct.png,2,CT,1,CT: x,note,surplus",  # 14: ragged
        "",  # 15: blank, skipped but counted
        'images/xr.png,1,X-ray,3,"chest X-ray: line one\nline two",',  # 16: good, one row over two lines
        "images/ct.png,0,CT,2.5,CT: x,",  # 17: two faults
        "images/ct.png,2,CT,1,CT: spare cells,,",  # 18: good, trailing empty cells
    ]
    (study / "ratings.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    ratings = read_ratings(study / "ratings.csv")

    root = study.resolve()
    assert [str(error) for error in ratings.errors] == [
        f"row 4: image_path: outside the data root {root}",
        f"row 5: image_path: outside the data root {root}",
        f"row 6: image_path: outside the data root {root}",
        "row 7: rating: 5 is not between 1 and 3",
        "row 8: rating: 'abc' is not a number",
        "row 9: expert_level: '4' is not 1, 2 or 3",
        "row 10: prompt: empty",
        "row 11: modality: 'PET: x' is not a modality name (at most 4 words and 40 characters: letters, digits, "
        "spaces and - / + . ( ) ' &)",
        "row 12: image_path: file not found",
        "row 13: image_path: not a readable image (image file is truncated)",
        "row 14: row: 7 fields, but the header has 6",
        "row 17: rating: 0 is not between 1 and 3",
        "row 17: expert_level: '2.5' is not 1, 2 or 3",
    ]
    rows = ratings.rows
    assert list(rows.columns) == [
        "row", "image_path", "path", "rating", "score", "modality", "expert_level", "prompt",
    ]
    assert rows["row"].tolist() == [2, 3, 16, 18]
    assert rows["image_path"].tolist() == ["images/ct.png", "images/mr.png", "images/xr.png", "images/ct.png"]
    assert rows["path"].tolist() == [root / "images" / f"{name}.png" for name in ("ct", "mr", "xr", "ct")]
    assert rows["rating"].tolist() == [2.0, 3.0, 1.0, 2.0]
    assert rows["score"].tolist() == [0.5, 1.0, 0.0, 0.5]
    assert rows["modality"].tolist() == ["CT", "MRI", "XRAY", "CT"]
    assert rows["expert_level"].tolist() == [1, 2, 3, 1]
    assert rows["prompt"].tolist() == [
        "CT: liver", "MRI: brain", "chest X-ray: line one\nline two", "CT: spare cells",
    ]


def test_custom_scale_and_skipping_image_decoding(study, tmp_path):
    csv_path = tmp_path / "elsewhere" / "ratings.csv"
    row = {"image_path": "images/broken.png", "rating": 7, "modality": "OCT", "expert_level": 2, "prompt": "OCT: fluid"}
    write_ratings([row], csv_path)

    config = RatingsConfig(rating_min=0, rating_max=10, check_images=False)  # the truncated image is not decoded
    ratings = read_ratings(csv_path, data_root=study, config=config)

    assert ratings.errors == []
    assert ratings.rows["score"].tolist() == [0.7]
    assert ratings.rows["path"].tolist() == [study.resolve() / "images" / "broken.png"]


def test_write_then_read_round_trip(study):
    written = [
        {"image_path": "images/ct.png", "rating": 1.5, "modality": "CT", "expert_level": 3,
         "prompt": "CT: liver, with a comma", "extra": "dropped"},
        {"image_path": "images/mr.png", "rating": 3, "modality": "MRI", "expert_level": 1,
         "prompt": 'MRI: "quoted" lesion'},
    ]
    path = write_ratings(written, study / "exports" / "out.csv")

    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(COLUMNS)
    rows = read_ratings(path, data_root=study).rows
    assert rows[list(COLUMNS)].to_dict("records") == [
        {key: value for key, value in row.items() if key != "extra"} for row in written
    ]
    again = read_ratings(write_ratings(rows, study / "again.csv")).rows  # a read frame writes back as-is
    assert again.drop(columns="row").equals(rows.drop(columns="row"))


def test_report_text():
    clean = Ratings(rows=pd.DataFrame({"row": [2, 3]}), errors=[])
    assert clean.report() == "2 rows usable, none rejected"
    faulty = Ratings(clean.rows, [
        RowError(4, "rating", "'abc' is not a number"),
        RowError(4, "prompt", "empty"),
        RowError(6, "row", "7 fields, but the header has 5"),
    ])
    assert faulty.report() == (
        "2 rows usable, 2 rejected:\n"
        "  row 4: rating: 'abc' is not a number\n"
        "  row 4: prompt: empty\n"
        "  row 6: row: 7 fields, but the header has 5"
    )


def test_missing_columns_are_all_named(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("image_path,score,modality,prompt\nimages/ct.png,2,CT,CT: x\n", encoding="utf-8")
    with pytest.raises(RatingsFileError) as caught:
        read_ratings(path)
    expected = f"{path} lacks the column(s) rating, expert_level; it has: image_path, score, modality, prompt"
    assert str(caught.value) == expected


def test_missing_empty_and_binary_files_are_file_errors(tmp_path):
    with pytest.raises(RatingsFileError, match="ratings file not found: .*nowhere.csv"):
        read_ratings(tmp_path / "nowhere.csv")
    (tmp_path / "empty.csv").write_text("\n\n", encoding="utf-8")
    with pytest.raises(RatingsFileError, match="empty.csv is empty"):
        read_ratings(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(",".join(COLUMNS) + "\n", encoding="utf-8")
    with pytest.raises(RatingsFileError, match="has a header but no rows"):
        read_ratings(tmp_path / "header.csv")
    (tmp_path / "sheet.csv").write_bytes(b"PK\x03\x04\xff\xfe binary spreadsheet")
    with pytest.raises(RatingsFileError, match="is not a UTF-8 CSV text file"):
        read_ratings(tmp_path / "sheet.csv")


def test_config_needs_a_scale_that_goes_up():
    with pytest.raises(ValueError, match="rating_max"):
        RatingsConfig(rating_min=3, rating_max=3)


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in entries.items():
            zipped.writestr(name, data)
    return path


def test_an_archive_over_the_file_count_is_refused_before_anything_is_written(tmp_path):
    archive = _zip(tmp_path / "many.zip", {"ratings.csv": b"x", **{f"images/{k}.png": b"" for k in range(4)}})
    with pytest.raises(RatingsFileError, match="many.zip: 5 entries; the limit is 4 files per ratings archive"):
        unpack_ratings_archive(archive, tmp_path / "out", max_files=4)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert unpack_ratings_archive(archive, tmp_path / "out", max_files=5).name == "ratings.csv"


def test_an_archive_over_the_uncompressed_size_is_refused_unread(tmp_path):
    # 3 MB of zeros compress to a few kB: the declared sizes add up to 3,000,001 bytes
    archive = _zip(tmp_path / "bomb.zip", {"ratings.csv": b"x", "images/zeros.png": bytes(3_000_000)})
    assert archive.stat().st_size < 10_000
    with pytest.raises(RatingsFileError, match="bomb.zip: unpacks to 3,000,001 bytes; the limit is 2,000,000 bytes"):
        unpack_ratings_archive(archive, tmp_path / "out", max_bytes=2_000_000)
    assert not (tmp_path / "out" / "images").exists()
    assert (MAX_ARCHIVE_FILES, MAX_ARCHIVE_BYTES) == (20_000, 4 * 1024**3)  # the defaults the README names


def test_an_archive_whose_member_is_damaged_is_a_file_error_naming_it(tmp_path):
    archive = _zip(tmp_path / "damaged.zip", {"ratings.csv": b"image_path,rating\n" * 2000})
    data = bytearray(archive.read_bytes())
    start = data.index(b"ratings.csv") + len("ratings.csv")  # the local header's name; the deflated bytes follow
    data[start + 20:start + 40] = bytes(20)
    archive.write_bytes(bytes(data))
    with pytest.raises(RatingsFileError, match="damaged.zip: not a readable zip archive"):
        unpack_ratings_archive(archive, tmp_path / "out")
