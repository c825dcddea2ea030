"""`python -m multimoe.serving.load`: the bounded load test, against `multimoe serve --testbed` only
(the comparison with `transformers serve` takes minutes; docs/benchmarks.md has its numbers)."""

from __future__ import annotations

from collections import Counter

from multimoe.serving import load


def test_request_list_is_seeded_and_covers_every_tenant():
    even, flood = load.request_list(64, seed=3), load.request_list(64, seed=3, flood=True)
    assert even == load.request_list(64, seed=3) != load.request_list(64, seed=4)
    assert Counter(request.tenant for request in even) == {tenant: 16 for tenant in load.TENANTS}
    counts = Counter(request.tenant for request in flood)
    assert counts[load.TENANTS[0]] == 64 - 3 * 3 and all(counts[tenant] == 3 for tenant in load.TENANTS[1:])
    for tenant in load.TENANTS:  # held-out prompts, none twice
        prompts = [request.prompt for request in even if request.tenant == tenant]
        assert len(set(prompts)) == len(prompts)


def test_load_against_multimoe_answers_every_request(capsys):
    (report,) = load.main(["--systems", "multimoe", "--requests", "8", "--clients", "4", "--max-tokens", "8"])
    assert (report.system, report.processes, report.errors, report.lost) == ("multimoe", 1, 0, 0)
    assert len(report.completed) == 8 and report.tokens == 8 * 8  # EOS ignored: every request its max_tokens
    assert report.peak_rss_bytes > 0
    printed = capsys.readouterr().out
    for tenant in load.TENANTS:
        assert len(report.ttfts(tenant)) == 2
        assert f"| {tenant} | 2 |" in printed
    assert "| multimoe | 1 | 8 | 0 | 0 |" in printed
