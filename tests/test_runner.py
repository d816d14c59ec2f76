"""The one CLI runner: optional settings can be switched off, lists are lists from the command line on."""

from dataclasses import dataclass
from typing import Literal

import pytest

from sae_core.cli import build_parser, from_flags, run_main


@dataclass(frozen=True)
class Options:
    """A config like every entry point's."""

    cap: int | None = 100
    """A cap that is on by default."""
    seed: int | None = None
    """Off by default."""
    sizes: tuple[int, ...] = ()
    """Some sizes."""
    stages: tuple[Literal["a", "b", "c"], ...] = ("a", "b")
    """Some stages."""
    verbose: bool = False
    """Talk more."""
    rate: float | Literal["auto"] = "auto"
    """A number or auto."""


def _parse(argv):
    return Options(**vars(build_parser(Options, "prog", "d").parse_args(argv)))


def test_an_optional_setting_with_a_default_can_be_switched_off():
    assert _parse([]).cap == 100
    assert _parse(["--cap", "none"]).cap is None
    assert _parse(["--cap", "None"]).cap is None
    assert _parse(["--cap", "7"]).cap == 7 and _parse(["--seed", "3"]).seed == 3


def test_lists_arrive_as_tuples_of_their_item_type_space_or_comma_separated():
    assert _parse(["--sizes", "16,16", "32"]).sizes == (16, 16, 32)
    assert _parse(["--sizes", "16", "16", "32"]).sizes == (16, 16, 32)
    assert _parse(["--stages", "c,a"]).stages == ("c", "a")
    assert _parse([]).stages == ("a", "b")
    assert _parse(["--stages", "none"]).stages == () and _parse(["--sizes", "None"]).sizes == ()  # as --help writes it


def test_a_number_or_a_word_setting_takes_either():
    assert _parse([]).rate == "auto" and _parse(["--rate", "Auto"]).rate == "auto"
    assert _parse(["--rate", "3e-3"]).rate == 3e-3


@pytest.mark.parametrize("argv, says", [
    (["--rate", "fast"], "--rate: invalid auto or float value: 'fast'"),
    (["--sizes", "16,x"], "--sizes: '16,x' is not a list of int values"),
    (["--stages", "a,dance"], "--stages: 'dance' is not one of a, b, c"),
    (["--cap", "many"], "--cap"),
])
def test_a_bad_value_is_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(Options, argv, "prog", "d", run=lambda cfg: cfg)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err and "Traceback" not in err


def test_help_shows_how_to_switch_off_and_lists_as_typed(capsys):
    with pytest.raises(SystemExit):
        build_parser(Options, "prog", "d").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A cap that is on by default. (none switches it off) (default: 100)" in text
    assert "Some stages. (default: a,b)" in text and "Some sizes. (default: none)" in text
    assert "Off by default. (default: None)" in text and "(none switches it off)" not in text.split("Off by")[1]


def test_every_entry_points_config_parses_with_the_runner():
    """No config field has a type the runner cannot build a flag for (it raises TypeError at build)."""
    from jax_sae.train import TrainConfig
    from launch.pipeline import PipelineConfig

    cfg = Options(**vars(build_parser(Options, "p", "d").parse_args([])))
    assert cfg == Options()
    train = from_flags(TrainConfig, vars(build_parser(TrainConfig, "p", "d").parse_args(
        ["--sae_type", "matryoshka", "--hidden_dim", "64", "--top_k", "4", "--group_sizes", "16,16,32",
         "--max_tokens", "none"])))
    assert train.sae.group_sizes == (16, 16, 32) and train.train.max_tokens is None
    assert train.sae_config(d_model=8).group_sizes == (16, 16, 32)
    assert TrainConfig.of(sae_type="matryoshka", hidden_dim=64, top_k=4).sae_config(d_model=8).group_sizes == \
        (2, 6, 24, 32)  # nested prefixes of h/32, h/8, h/2 and h
    assert PipelineConfig(**vars(build_parser(PipelineConfig, "p", "d").parse_args(
        ["--stages", "train", "discover"]))).stages == ("train", "discover")


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device", "/data/store/layer1/acts/c/0/0"),
    ValueError("RESOURCE_EXHAUSTED: Error writing local file \"store/layer1/acts/c/0/0\": Failed to write 12804 "
               "bytes to file 4: No space left on device [os_error_code='28']"),
])
def test_a_full_disk_is_one_line_naming_the_file_and_exit_2(error, capsys):
    """A full disk arrives as OSError, or as tensorstore's (and orbax's) error text around one."""
    def run(_cfg):
        raise error

    with pytest.raises(SystemExit) as exc:
        run_main(Options, [], "prog", "d", run=run)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: out of disk space (")
    assert "layer1/acts/c/0/0" in err and "rerun the same command to resume" in err


def test_other_errors_keep_their_traceback():
    def run(_cfg):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_main(Options, [], "prog", "d", run=run)


def test_default_matryoshka_groups_are_the_benchmark_levels_and_valid_at_any_width():
    from jax_sae.config import default_group_sizes

    assert default_group_sizes(4096) == (128, 384, 1536, 2048)  # prefixes 128, 512, 2048, 4096
    for h in (1, 2, 3, 16, 31, 100, 1000):
        groups = default_group_sizes(h)
        assert sum(groups) == h and min(groups) > 0, (h, groups)
