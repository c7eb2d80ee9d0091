"""``bt-fast bench loss``: both methods run end to end at toy sizes and report ratios.

Speed is not asserted (these machines are shared); the structure, the baseline's
identity and the byte counts against the cost model are.
"""

import argparse
import json

import pytest
import torch

from bt_fast.bench import loss as bench
from bt_fast.kernels import vicreg_loss_reference, vicreg_official_loss


def _args(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_method_flag_defaults_and_choices():
    assert _args().method == "barlow_twins"
    assert _args("--method", "vicreg").method == "vicreg"
    with pytest.raises(SystemExit):
        _args("--method", "simclr")
    assert bench.METHODS["vicreg"].sizes == "256x8192"  # the size issue 13 asks about


def test_official_vicreg_is_the_reference_on_one_process():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(11, 7, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    official = vicreg_official_loss(z1, z2)
    want = vicreg_loss_reference(z1, z2)
    torch.testing.assert_close(official, want)
    torch.testing.assert_close(torch.autograd.grad(official, z1)[0], torch.autograd.grad(want, z1)[0])


@pytest.mark.parametrize("method,impls", [("vicreg", ["gram"]), ("barlow_twins", ["reference", "gram"])])
def test_bench_size_times_each_impl_against_the_official(method, impls):
    row = bench.bench_size(24, 40, impls, "cpu", 0.0, method)
    assert (row["n"], row["d"]) == (24, 40) and row["auto"] in ("gram", "reference")
    assert set(row["impls"]) == {"official", *impls}
    for r in row["impls"].values():
        assert r["seconds"] > 0 and r["peak_bytes"] > 0
    assert row["impls"]["official"]["speedup_vs_official"] == 1.0


def test_vicreg_json_report(capsys):
    assert bench.run(_args("--json", "--method", "vicreg", "--sizes", "16x96", "--comm-sizes", "",
                           "--min-seconds", "0")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "vicreg" and report["comm"] == []
    (row,) = report["timing"]
    gram = row["impls"]["gram"]
    # at N << D the Gram form holds [N, N] and [N, D] where the official holds [D, D]
    assert gram["memory_ratio_vs_official"] > 2


@pytest.mark.slow
def test_vicreg_bytes_sent_match_the_cost_model():
    rows = bench.bench_comm([(8, 48)], [2], "vicreg")  # spawns 2 gloo processes
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"official", "gram_fp32", "gram_bf16"}
    for r in rows:
        assert r["sent_bytes"] == pytest.approx(r["model_sent_bytes"])
        assert r["sent_bytes_backward"] == (0 if r["case"] != "official" else pytest.approx(2 * 8 * 48 * 4))
    assert by_case["gram_bf16"]["fewer_bytes_vs_official"] > by_case["gram_fp32"]["fewer_bytes_vs_official"] > 1
