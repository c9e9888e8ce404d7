"""The PHI byte scan of the scenario and the DVC test (``scenarios.retrain.scan``): an identifier
written as text is found in every format the training side writes; the same digits standing in a
tensor's or array's raw numbers are not reported (they are numbers, not text: a scenario run
failed on a planted 5-digit StudyID found among an ``optimizer.pt``'s float bytes)."""

from __future__ import annotations

import gzip
import pickle
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from scenarios.retrain import contains_word, scan

ID = "81317"
#: float32 numbers whose raw bytes spell the identifier between two non-alphanumeric bytes
NUMBERS = np.frombuffer(b"\x00" + ID.encode() + b"\x00\x00" + b"\x00" * 8, dtype=np.float32).copy()


def raw_holds_id(path: Path) -> bool:
    """The file's bytes (unpacked when gzip'd) hold the identifier as a word: what the scan
    reported before it read formats."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return contains_word(data.lower(), ID.encode())


def test_the_id_in_a_torch_checkpoints_numbers_is_not_text_but_as_a_key_it_is_found(tmp_path):
    # the key ends with the ID and the pickle's next opcode is 'q': only read as a pickle's
    # strings does the ID stand as a word
    numbers = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg_sq": torch.from_numpy(NUMBERS)}}}, numbers)
    assert raw_holds_id(numbers), "the test's numbers do not spell the identifier"
    assert scan([numbers], {ID}) == []

    keyed = tmp_path / "keyed.pt"
    torch.save({"state": {f"case_{ID}": torch.zeros(2)}}, keyed)
    assert scan([keyed], {ID}) == [f"{keyed}: {ID}"]


def test_safetensors_numbers_are_skipped_and_their_metadata_scanned(tmp_path):
    numbers = tmp_path / "model.safetensors"
    save_file({"w": NUMBERS}, str(numbers))
    assert raw_holds_id(numbers)
    assert scan([numbers], {ID}) == []

    tagged = tmp_path / "tagged.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(tagged), metadata={"source": f"patient {ID}"})
    assert scan([tagged], {ID}) == [f"{tagged}: {ID}"]


def test_npy_and_nifti_numbers_are_skipped_and_a_nifti_description_is_scanned(tmp_path):
    array = tmp_path / "image.npy"
    np.save(array, NUMBERS)
    assert raw_holds_id(array)
    volume = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(NUMBERS.reshape(4, 1, 1), np.eye(4)), volume)
    assert raw_holds_id(volume)
    assert scan([array, volume], {ID}) == []

    described = nib.Nifti1Image(np.zeros((2, 2, 1), np.float32), np.eye(4))
    described.header["descrip"] = f"study {ID}".encode()
    labelled = tmp_path / "described.nii.gz"
    nib.save(described, labelled)
    assert scan([labelled], {ID}) == [f"{labelled}: {ID}"]


def test_a_compressed_zip_member_is_read_unpacked(tmp_path):
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("notes.txt", f"seen by Doe^Jane, ID {ID}\n" * 20)
    assert not raw_holds_id(archive), "deflate hides the text from a plain byte scan"
    assert scan([archive], {ID, "doe"}) == [f"{archive}: {ID}", f"{archive}: doe"]


NOT_NIFTI = bytes(108) + b"\xff\xff\xff\x7f" + bytes(232) + b"n+1\x00" + bytes(4)  # NIfTI's magic, a NaN vox_offset


@pytest.mark.parametrize("payload", [b"PK\x03\x04 not really a zip " + ID.encode() + b" .", b"\x93NUMPY", NOT_NIFTI])
def test_a_file_that_only_looks_like_a_format_is_scanned_whole(tmp_path, payload):
    path = tmp_path / "odd.bin"
    path.write_bytes(payload + b" " + ID.encode() + b" ")
    assert scan([path], {ID}) == [f"{path}: {ID}"]


def test_a_plain_text_file_still_finds_names_in_any_case(tmp_path):
    log = tmp_path / "day1.log"
    log.write_bytes(b"trained on DOE^JANE\n")
    assert scan([log], {"Doe^Jane"}) == [f"{log}: doe^jane"]


def test_a_pickle_file_is_scanned_as_bytes_and_as_its_strings(tmp_path):
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"trial": f"case_{ID}"}, protocol=2))
    assert scan([path], {ID}) == [f"{path}: {ID}"]
