import pytest
import torch
from torch import nn

from qbert_deploy.models.modules import QuantEmbedding
from qbert_deploy.recipe import WeightQuant


@pytest.mark.parametrize("groups", [None, 10])
def test_embedding_training_and_inference_paths_agree(groups: int | None) -> None:
    torch.manual_seed(0)
    embedding = QuantEmbedding(nn.Embedding(1000, 32), WeightQuant(bits=8, groups=groups))
    ids = torch.randint(0, 1000, (4, 9))
    trained = embedding.train()(ids)
    with torch.no_grad():
        inferred = embedding.eval()(ids)
    torch.testing.assert_close(trained.detach(), inferred, rtol=0, atol=0)
    trained.sum().backward()
    assert embedding.weight.grad is not None and embedding.weight.grad[ids.unique()].abs().sum() > 0


def test_inference_table_follows_weight_updates() -> None:
    embedding = QuantEmbedding(nn.Embedding(50, 8), WeightQuant(bits=8, groups=None)).eval()
    ids = torch.arange(50)
    with torch.no_grad():
        before = embedding(ids).clone()
        embedding.weight.mul_(2.0)
        after = embedding(ids)
    torch.testing.assert_close(after, before * 2.0, rtol=1e-6, atol=1e-6)
