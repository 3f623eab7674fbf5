"""The README's promises: its first commands, and a configuration table that matches the code."""

from pathlib import Path

from gateway.config import markdown_table

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_starts_with_the_run_and_test_commands():
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_readme_configuration_table_is_generated_from_the_config_struct():
    assert markdown_table() in README, (
        "README's configuration table is stale: paste the output of "
        "`python -c 'from gateway.config import markdown_table; print(markdown_table())'`"
    )
