"""docs/jobs.md is the job spec written out: regenerated, it comes out the same, and every key
of the spec says what it does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from distnet.train.jobs import jobsdoc, jobspec

JOBS_MD = Path(__file__).resolve().parents[2] / "docs" / "jobs.md"


def test_the_committed_jobs_reference_is_the_generated_one():
    assert JOBS_MD.read_text() == jobsdoc.render(), (
        f"docs/jobs.md is stale (the job spec or its help changed); regenerate it: "
        f"{jobsdoc.COMMAND}"
    )


def test_every_key_of_the_spec_has_help_and_no_help_names_a_missing_key():
    assert jobsdoc.missing_help() == [], "add these to distnet/train/jobs/jobhelp.py (or remove)"


def test_every_key_and_its_default_appear_in_its_section():
    text = JOBS_MD.read_text()
    for section, field in jobspec.JobSpec.model_fields.items():
        body = text.split(f"## [{section}]\n", 1)[1].split("\n## ", 1)[0]
        for key, sub in field.annotation.model_fields.items():
            row = next(line for line in body.splitlines() if line.startswith(f"| `{key}` |"))
            assert f"`{jobsdoc.toml_value(sub.default)}`".replace("|", "\\|") in row, row


def test_types_and_ranges_in_words():
    cases = {
        Annotated[int, Field(gt=0)]: "integer > 0",
        Annotated[float, Field(ge=0.0, lt=1.0)]: "number in [0, 1)",
        float | None: "number, or absent",
        Literal["auto", True, False]: '"auto", true or false',
        list[Annotated[int, Field(gt=0)]]: "list of integers > 0",
        int | list[Annotated[int, Field(ge=0)]]: "integer, or list of integers >= 0",
        dict[str, float]: "table of numbers",
    }
    for annotation, words in cases.items():
        assert jobsdoc.type_text(annotation) == words


def test_check_says_stale_and_names_the_command(tmp_path, capsys):
    stale = tmp_path / "jobs.md"
    stale.write_text(jobsdoc.render().replace("`32`", "`64`"))
    assert jobsdoc.main(["--check", str(stale)]) == 1
    assert jobsdoc.COMMAND in capsys.readouterr().err
    stale.write_text(jobsdoc.render())
    assert jobsdoc.main(["--check", str(stale)]) == 0
