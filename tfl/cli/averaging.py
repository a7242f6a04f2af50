"""Commands that average the weights of runs: wise-ft (a run with its pretrained backbone) and soup (runs with
each other)."""

from __future__ import annotations

import click

from tfl import api
from tfl.cli.core import call, cli, echo_err, echo_json
from tfl.cli.params import eval_batch_size


@cli.command("wise-ft")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="A run directory from `tfl finetune` (or a recipe's run with a tfl classifier).")
@click.option("--alphas", metavar="A,A,...",
              help="The alphas to try, in [0, 1], separated by commas; 1 (the fine-tuned run) is always tried.  "
                   "[default: 0,0.1,...,1]")
@click.option("--alpha", type=click.FloatRange(0, 1), metavar="A",
              help="Keep this alpha instead of the val split's best (1 is scored beside it). Val is drawn like the "
                   "training data, so it favours alpha = 1; when the data you will serve may shift, the WiSE-FT "
                   "authors use a fixed alpha = 0.5.")
@click.option("--output", type=click.Path(file_okay=False), metavar="DIR",
              help="The new run directory (must be empty or missing). Default: <run>-wiseft.")
@eval_batch_size
@click.option("--json", "as_json", is_flag=True,
              help='Print {"run_dir", "source_run", "alpha", "rows": [{"alpha", "val_accuracy", "val_nll", '
                   '"test_accuracy", "test_nll"}], "metrics"} instead of the table.')
def wise_ft(run_dir, alphas, alpha, output, batch_size, as_json):
    """WiSE-FT: interpolate a run's backbone between its pretrained and fine-tuned weights, keep the best on val.

    The backbone becomes (1 - alpha) x pretrained + alpha x fine-tuned (BatchNorm's moving statistics too); the
    fine-tuned head is kept. Each alpha is scored on the val and test splits; the best val accuracy wins (ties: the
    larger alpha). Writes a run directory that every command accepts, with wise_ft.csv and wise_ft.png (accuracy
    against alpha). For a run trained with --weights none, "pretrained" is its seeded random initialisation.
    """
    result = call(api.wise_ft, run_dir, alphas=alphas, alpha=alpha, output=output, batch_size=batch_size,
                  log=(lambda *_: None) if as_json else echo_err)
    if as_json:
        echo_json(result)
    else:
        from tfl.recipes.averaging import format_wise

        click.echo(format_wise(result))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output", type=click.Path(file_okay=False), metavar="DIR",
              help="The new run directory (must be empty or missing). Default: <first run>-soup.")
@eval_batch_size
@click.option("--json", "as_json", is_flag=True,
              help='Print {"run_dir", "ingredients": [{"ingredient", "val_accuracy", "soup_val_accuracy", "kept"}], '
                   '"kept", "warnings", "metrics"} instead of the table.')
def soup(runs, output, batch_size, as_json):
    """Greedy model soup: average the weights of RUNS (one architecture, one initialisation), kept only if val
    does not drop.

    The runs are ranked by val accuracy (on the first run's val split); from the best, each next run joins the
    uniform average when the soup's val accuracy does not fall, so the soup never scores below its best run on
    val. Writes a run directory that every command accepts, with soup.csv (each run, its val accuracy, the soup's
    after trying it, kept or not).
    """
    result = call(api.soup, list(runs), output=output, batch_size=batch_size,
                  log=(lambda *_: None) if as_json else echo_err)
    if as_json:
        echo_json(result)
    else:
        from tfl.recipes.averaging import format_soup

        click.echo(format_soup(result))
