import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pfclib.sampler import draw_without_replacement, num_sampled, remap_labels, sample_classes


@st.composite
def _problem(draw):
    n_local = draw(st.integers(1, 300))
    positives = sorted(draw(st.sets(st.integers(0, n_local - 1), max_size=min(n_local, 40))))
    rate = draw(st.floats(0.001, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_local, torch.tensor(positives, dtype=torch.int64), rate, seed


@settings(max_examples=200, deadline=None)
@given(_problem())
def test_sampler_invariants(problem):
    n_local, positives, rate, seed = problem
    k = num_sampled(rate, n_local)
    index = sample_classes(positives, n_local, k, torch.Generator().manual_seed(seed))
    assert index.dtype == torch.int64 and index.dim() == 1
    assert index.numel() == max(k, positives.numel())
    assert bool((index[1:] > index[:-1]).all()), "sorted, distinct"
    if index.numel():
        assert 0 <= int(index[0]) and int(index[-1]) < n_local
    assert set(positives.tolist()) <= set(index.tolist())
    # same generator state -> same draw
    again = sample_classes(positives, n_local, k, torch.Generator().manual_seed(seed))
    assert torch.equal(index, again)


@settings(max_examples=100, deadline=None)
@given(_problem(), st.integers(1, 30))
def test_remap_points_back_to_the_label(problem, batch):
    n_local, positives, rate, seed = problem
    if positives.numel() == 0:
        return
    g = torch.Generator().manual_seed(seed)
    local = positives[torch.randint(positives.numel(), (batch,), generator=g)]
    local = torch.where(torch.rand(batch, generator=g) < 0.3, torch.full_like(local, -1), local)
    index = sample_classes(positives, n_local, num_sampled(rate, n_local), g)
    target = remap_labels(local, index)
    mine = local >= 0
    assert torch.equal(target[~mine], torch.full_like(target[~mine], -1))
    assert torch.equal(index[target[mine]], local[mine])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.data())
def test_draw_without_replacement_is_a_distinct_subset(population, data):
    count = data.draw(st.integers(0, population))
    out = draw_without_replacement(
        population, count, torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    assert out.numel() == count == out.unique().numel()
    if count:
        assert 0 <= int(out.min()) and int(out.max()) < population


@pytest.mark.parametrize("population, count", [(50, 5), (50, 30)])  # rejection path and permutation path
def test_draw_is_uniform_over_elements_and_pairs(population, count):
    g = torch.Generator().manual_seed(123)
    trials = 4000
    hits = torch.zeros(population)
    pair = 0
    for _ in range(trials):
        s = draw_without_replacement(population, count, g)
        hits[s] += 1
        pair += int(bool((s == 0).any()) and bool((s == 1).any()))
    expected = trials * count / population
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 100.0, f"chi2 {chi2:.1f} with 49 dof"  # p ~ 3e-5 under uniformity
    p_pair = count * (count - 1) / (population * (population - 1))
    sd = (trials * p_pair * (1 - p_pair)) ** 0.5
    assert abs(pair - trials * p_pair) < 5 * sd


def test_negatives_are_uniform_over_non_positives():
    positives = torch.tensor([0, 3, 4, 9])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(3000):
        counts[sample_classes(positives, 12, 7, g)] += 1
    assert torch.all(counts[positives] == 3000)
    rest = counts[[i for i in range(12) if i not in positives.tolist()]]
    expected = 3000 * 3 / 8
    assert float(((rest - expected) ** 2 / expected).sum()) < 30.0  # 7 dof


def test_positives_exceeding_k_are_used_exactly():
    positives = torch.tensor([1, 2, 5, 7])
    out = sample_classes(positives, 10, 2, torch.Generator().manual_seed(0))
    assert out.tolist() == [1, 2, 5, 7]


def test_draw_cost_does_not_scale_with_population():
    # the draw for small k touches O(k) values: it works for a population far beyond memory
    out = draw_without_replacement(10**15, 1000, torch.Generator().manual_seed(0))
    assert out.unique().numel() == 1000


def test_sampler_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="sample_rate must be in"):
        num_sampled(0.0, 10)
    with pytest.raises(ValueError, match=r"positives must lie in \[0, 10\)"):
        sample_classes(torch.tensor([3, 10]), 10, 5, g)
    with pytest.raises(ValueError, match="sorted ascending"):
        sample_classes(torch.tensor([3, 1]), 10, 5, g)
    with pytest.raises(ValueError, match="cannot draw 5"):
        draw_without_replacement(3, 5, g)
    with pytest.raises(ValueError, match=r"local positive classes \[2\] are missing"):
        remap_labels(torch.tensor([2, -1]), torch.tensor([0, 1, 3]))


def test_k_is_the_floor_of_r_times_n_not_the_rounding():
    import pfclib

    assert num_sampled(0.29, 10) == 2  # round() would give 3
    assert num_sampled(0.999, 1000) == 999 and num_sampled(0.1, 9) == 0
    head = pfclib.PartialFC(10, 4, sample_rate=0.29)
    head(torch.randn(1, 4), torch.tensor([0]))
    assert head.last_index.numel() == 2
