import torch

from lit_rlhf.data.loaders import LengthGroupedShuffle


def batches_of(sampler, batch_size):
    order = list(sampler)
    return order, [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def test_length_grouped_shuffle_is_a_seeded_permutation_of_similar_length_batches():
    lengths = torch.randint(10, 500, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedShuffle(range(203), seed=3, lengths=lengths, batch_size=8, group_batches=5)
    order, batches = batches_of(sampler, 8)
    assert sorted(order) == list(range(203))
    assert order == list(sampler)  # same (seed, epoch): same order, as a resumed run needs
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert [len(b) for b in batches] == [8] * 25 + [3]  # the short batch is last: boundaries stay aligned

    def padding(batches):  # padded tokens when each batch is padded to its longest item
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(3)).tolist()
    random_batches = [shuffled[i : i + 8] for i in range(0, 203, 8)]
    assert padding(batches) < 0.3 * padding(random_batches)
