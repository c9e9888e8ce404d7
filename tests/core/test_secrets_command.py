"""python -m mvl_pipeline.commands.secrets ensure-key on a credentials file it cannot use: one line
that says what is wrong and exit status 2, never a traceback (``make key`` runs it before every
``make train``)."""

from __future__ import annotations

import logging

import pytest

from mvl_pipeline.commands.secrets import main


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("s3:\n  key: AKIA\n  secret: [unclosed\n", "not valid YAML"),
        ("- a list\n- not a mapping\n", "must hold a YAML mapping"),
    ],
)
def test_an_unusable_credentials_file_is_one_error_line_and_left_as_it_was(tmp_path, caplog, content, message):
    path = tmp_path / "credentials.yml"
    path.write_text(content)
    with caplog.at_level(logging.ERROR):
        assert main(["ensure-key", str(path)]) == 2
    assert message in caplog.text and "no key was written" in caplog.text
    assert "AKIA" not in caplog.text  # the file's secrets are never quoted
    assert path.read_text() == content


def test_a_folder_instead_of_the_file_is_one_error_line(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["ensure-key", str(tmp_path)]) == 2
    assert "IsADirectoryError" in caplog.text
