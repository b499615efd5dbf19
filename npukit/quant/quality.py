"""Quality checks for a quantised model: perplexity on a fixed passage, teacher-forced top-1 agreement with
the unquantised model, and the quantise -> dequantise error of every projection."""
from __future__ import annotations

import torch

from .kernels import quantize_per_channel
from .layers import named_linears
from .linear import QuantLinear

# NOTE: a fixed passage, different from the smoothing calibration text.
EVAL_TEXT = (
    "The lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper "
    "climbed the spiral stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships "
    "passing the rocky coast watched for its beam, which flashed twice every ten seconds, and knew exactly "
    "where they were. When electric lamps arrived, the keeper's work changed: there was no oil to carry, but "
    "the generator needed care, and storms still cut the power. In 1990 the light became automatic, and the "
    "last keeper moved to the village below, where he taught children how the lens bends light into a beam "
    "that can be seen thirty kilometres away.\n\n"
    "A recipe for bread needs only four things: flour, water, salt and yeast. Mix them, knead the dough for "
    "ten minutes until it is smooth, and leave it in a warm place for an hour. It will double in size. Shape "
    "it into a loaf, let it rise again, and bake it in a hot oven for about forty minutes. The crust should be "
    "brown and the loaf should sound hollow when you tap the bottom.\n\n"
    "Q: Why is the sky blue?\nA: Sunlight contains every colour. Air molecules scatter short wavelengths, such "
    "as blue, much more than long ones, such as red, so blue light reaches our eyes from every direction.\n"
    "Q: How many days are there in a leap year?\nA: There are 366 days in a leap year.\n\n"
    "def mean(values):\n    if not values:\n        raise ValueError(\"mean of an empty list\")\n"
    "    return sum(values) / len(values)\n\n"
    "The committee met on Tuesday to discuss the new library. Most members agreed that the building should "
    "have more space for children, a quiet reading room and longer opening hours at weekends. The budget, "
    "however, allows only two of the three, and a vote is planned for next month."
)


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [T, vocab] of a teacher-forced pass over one sequence of token ids."""
    ids = input_ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)
    return model(ids).logits[0].float()


def perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """exp(mean negative log-likelihood of token t+1 given tokens <= t)."""
    ids = input_ids.reshape(-1).to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    return float(torch.exp(nll))


def top1_agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Share of positions where both models' most likely next token is the same."""
    return float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())


def weight_error(model) -> list[tuple[str, float]]:
    """(layer name, relative Frobenius error ||W - dequant(quant(W))|| / ||W||) of every projection.

    On an unquantised model this quantises a copy of each weight; on a quantised one it cannot (the float
    weight is gone), so call it before quantize_model."""
    out = []
    for name, lin in named_linears(model):
        if isinstance(lin, QuantLinear):
            raise ValueError("weight_error needs the float weights: call it before quantize_model")
        w = lin.weight.detach().float()
        q, s = quantize_per_channel(w)
        out.append((name, float((w - q.float() * s[:, None]).norm() / w.norm())))
    return out
