"""Image-text retrieval Recall@K as a Hugging Face `evaluate` module, computed by `clip_accel.metrics`.

Load it from its folder, not by name (`evaluate.load("retrieval_recall")` would look on the Hub):

    metric = evaluate.load("evaluate_modules/retrieval_recall")
    metric.compute(image_embeds=image_embeds, text_embeds=text_embeds, ks=(1, 5, 10))

The numbers are exactly those of `clip_accel.metrics.retrieval_metrics` (same keys, same pessimistic tie rule),
so results from this module and from the trainer's eval_results.json compare directly.
"""

import datasets
import evaluate
import torch
import torch.nn.functional as F

# Imported inside `try` on purpose: evaluate scans top-level imports and would ask for `pip install clip_accel`,
# which is not the distribution's name.
try:
    from clip_accel.metrics import retrieval_metrics
except ImportError as error:
    raise ImportError("The retrieval_recall metric computes with clip_accel: pip install clip-accel") from error

_DESCRIPTION = """\
Recall@K for paired image and text embeddings, in both directions. Row i of `image_embeds` and row i of
`text_embeds` are a pair, and each query's only positive is its own pair. rank_i is the number of other
candidates scoring >= the positive (dot product of L2-normalised embeddings), so ties count against the query;
R@k is the fraction of queries with rank_i < k. Mean and median rank are 1-based.
"""

_KWARGS_DESCRIPTION = """
Args:
    image_embeds (`list` of `list` of `float`): N image embeddings of dimension D, any scale (each row is
        L2-normalised here before scoring).
    text_embeds (`list` of `list` of `float`): N text embeddings of dimension D; row i pairs with image row i.
        L2-normalised here as well.
    ks (`tuple` of `int`, *optional*, defaults to `(1, 5, 10)`): the cut-offs K, each >= 1. For K > N,
        R@K is 1.0.

Returns:
    `image_to_text_R@{k}` and `text_to_image_R@{k}` for each k, `{direction}_mean_rank`,
    `{direction}_median_rank` (1-based) and `mean_R@1` (mean of the two R@1), all floats.

Examples:
    >>> metric = evaluate.load("evaluate_modules/retrieval_recall")
    >>> result = metric.compute(image_embeds=[[1.0, 0.0], [0.0, 1.0]], text_embeds=[[2.0, 0.1], [0.0, 3.0]],
    ...                         ks=(1,))
    >>> result["image_to_text_R@1"], result["text_to_image_R@1"]
    (1.0, 1.0)
"""

_CITATION = """\
@inproceedings{radford2021learning,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle={ICML},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@K and mean/median rank for image-text retrieval (see `clip_accel.metrics.retrieval_metrics`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "image_embeds": datasets.Sequence(datasets.Value("float32")),
                    "text_embeds": datasets.Sequence(datasets.Value("float32")),
                }
            ),
            reference_urls=["https://github.com/mlfoundations/open_clip"],
        )

    def _compute(self, image_embeds, text_embeds, ks=(1, 5, 10)) -> dict:
        """(N, D) lists -> the retrieval_metrics dict; rows are L2-normalised first, as that function expects."""
        images = F.normalize(torch.tensor(image_embeds, dtype=torch.float32), dim=-1)
        texts = F.normalize(torch.tensor(text_embeds, dtype=torch.float32), dim=-1)
        return retrieval_metrics(images, texts, ks=tuple(ks))
