"""What each merge method accepts: its parameters, defaults and input rules (mergekit 0.1.5's registry).

Every method mergekit 0.1.5 registers is here, with the parameter names, types, scopes and
defaults of its kernel signature and the input contract it declares (`InputContract`): whether a
base model is required, optional or ignored, and how many inputs (and non-base inputs) it takes.

The task-vector family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) is one algorithm with
two switches, as in mergekit's `GeneralizedTaskArithmeticMerge`: how each delta is sparsified
(top-k by magnitude, a magnitude band without outliers, a random Bernoulli drop, or DELLA's
rank-dependent drop) and whether signs are elected (TIES consensus).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bmx.merge.config import MergeConfigError
from bmx.merge.parameters import OPTIONAL_FLOAT, ParameterSpec, Scope


class BasePolicy(StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"  # used when configured (deltas are taken from it), else all inputs are peers
    IGNORED = "ignored"  # a configured base is just another input


class Sparsification(StrEnum):
    MAGNITUDE = "magnitude"  # ties: keep the top `density` fraction by |delta|
    RANDOM = "random"  # dare: Bernoulli(density) keep mask
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the top `gamma` and the bottom
    DELLA_MAGPRUNE = "della_magprune"  # della: keep probability grows with |delta|'s rank in its row


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str  # one line, for the README table and `--help`
    parameters: tuple[ParameterSpec, ...]
    base: BasePolicy
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    sparsification: Sparsification | None = None
    sign_consensus: bool = False

    @property
    def needs_base(self) -> bool:
        return self.base is BasePolicy.REQUIRED

    @property
    def task_vectors(self) -> bool:
        """One of GeneralizedTaskArithmeticMerge's configurations."""
        return any(p.name == "lambda" for p in self.parameters)

    def parameter(self, name: str) -> ParameterSpec:
        return next(p for p in self.parameters if p.name == name)

    @property
    def shared_parameters(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if p.scope is Scope.SHARED)

    @property
    def input_parameters(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if p.scope is not Scope.SHARED)


def _task_vector_method(name: str, description: str, sparsification: Sparsification | None, sign_consensus: bool,
                        normalize: bool, rescale: bool) -> MethodSpec:
    parameters = [
        ParameterSpec("int8_mask", bool, Scope.SHARED, default=False),
        ParameterSpec("normalize", bool, Scope.SHARED, default=normalize),
        ParameterSpec("rescale", bool, Scope.SHARED, default=rescale),
        ParameterSpec("lambda", float, Scope.SHARED, default=1.0),
        ParameterSpec("weight", float, Scope.NON_BASE),
        ParameterSpec("density", float, Scope.NON_BASE, default=1.0),
    ]
    if sparsification is Sparsification.MAGNITUDE_OUTLIERS:
        parameters.append(ParameterSpec("gamma", float, Scope.NON_BASE, default=0.01))
    if sparsification is Sparsification.DELLA_MAGPRUNE:
        parameters.append(ParameterSpec("epsilon", float, Scope.NON_BASE, default=0.15))
    return MethodSpec(name=name, description=description, parameters=tuple(parameters), base=BasePolicy.REQUIRED,
                      sparsification=sparsification, sign_consensus=sign_consensus)


_MAG, _RAND, _OUTLIERS, _DELLA = (Sparsification.MAGNITUDE, Sparsification.RANDOM, Sparsification.MAGNITUDE_OUTLIERS,
                                  Sparsification.DELLA_MAGPRUNE)

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear", "weighted average of the models",
                   (ParameterSpec("weight", float, Scope.INPUT), ParameterSpec("normalize", bool, Scope.SHARED, default=True)),
                   base=BasePolicy.IGNORED),
        MethodSpec("slerp", "spherical interpolation between the base and one other model, whole tensor as one vector",
                   (ParameterSpec("t", float, Scope.SHARED),), base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2),
        MethodSpec("nuslerp", "spherical interpolation of two models (or of their deltas from a base), whole tensor or per row",
                   (ParameterSpec("weight", float, Scope.NON_BASE),
                    ParameterSpec("nuslerp_row_wise", bool, Scope.SHARED, default=False),
                    ParameterSpec("nuslerp_flatten", bool, Scope.SHARED, default=True)),
                   base=BasePolicy.OPTIONAL, min_non_base=2, max_non_base=2),
        MethodSpec("multislerp", "barycentric interpolation of any number of models on the hypersphere (tangent-space mean)",
                   (ParameterSpec("weight", float, Scope.NON_BASE),
                    ParameterSpec("normalize_weights", bool, Scope.SHARED, default=True),
                    ParameterSpec("eps", float, Scope.SHARED, default=1e-8)),
                   base=BasePolicy.OPTIONAL, min_non_base=1),
        MethodSpec("karcher", "Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
                   (ParameterSpec("max_iter", int, Scope.SHARED, default=10), ParameterSpec("tol", float, Scope.SHARED, default=1e-5)),
                   base=BasePolicy.IGNORED),
        MethodSpec("passthrough", "copies one model's tensors (optionally scaled); with slices, stacks layer ranges (frankenmerge)",
                   (ParameterSpec("scale", OPTIONAL_FLOAT, Scope.INPUT, default=None),), base=BasePolicy.IGNORED, max_inputs=1),
        MethodSpec("model_stock", "interpolates the models' average towards the base by the angle between their deltas",
                   (ParameterSpec("filter_wise", bool, Scope.SHARED, default=False),), base=BasePolicy.REQUIRED, min_inputs=3),
        MethodSpec("sce", "select high-variance delta entries, weight each model by its delta's energy, elect signs",
                   (ParameterSpec("int8_mask", bool, Scope.SHARED, default=False),
                    ParameterSpec("select_topk", float, Scope.SHARED, default=1.0)),
                   base=BasePolicy.REQUIRED),
        MethodSpec("nearswap", "takes the other model's value where it is within t of the base's, blends elsewhere",
                   (ParameterSpec("t", float, Scope.SHARED),), base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2),
        MethodSpec("arcee_fusion", "keeps the other model's changes whose importance (delta magnitude × row KL divergence) is an upper outlier",
                   (), base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2),
        MethodSpec("ram", "Reinforced Agent Merging: deltas unique to one model are kept, shared ones averaged",
                   (ParameterSpec("epsilon", float, Scope.SHARED, default=1e-5),), base=BasePolicy.REQUIRED),
        MethodSpec("ramplus_tl", "RAM+, tensor-local: unique deltas amplified by the model's shared/unique ratio",
                   (ParameterSpec("r", float, Scope.SHARED, default=0.1), ParameterSpec("alpha", float, Scope.SHARED, default=0.2),
                    ParameterSpec("epsilon", float, Scope.SHARED, default=1e-5)),
                   base=BasePolicy.REQUIRED),
        _task_vector_method("task_arithmetic", "base + λ · weighted sum of the deltas", None, False, normalize=False, rescale=False),
        _task_vector_method("ties", "top-`density` deltas by magnitude, signs elected, agreeing deltas averaged", _MAG, True,
                            normalize=True, rescale=False),
        _task_vector_method("dare_ties", "random Bernoulli(`density`) drop with rescale, then TIES sign election", _RAND, True,
                            normalize=False, rescale=True),
        _task_vector_method("dare_linear", "random Bernoulli(`density`) drop with rescale, then a weighted sum", _RAND, False,
                            normalize=False, rescale=True),
        _task_vector_method("breadcrumbs", "drops the largest `gamma` and the smallest deltas, keeps `density`; weighted sum",
                            _OUTLIERS, False, normalize=False, rescale=False),
        _task_vector_method("breadcrumbs_ties", "breadcrumbs' sparsification, then TIES sign election", _OUTLIERS, True,
                            normalize=False, rescale=False),
        _task_vector_method("della", "random drop with keep probability density ± epsilon by magnitude rank, rescale, TIES",
                            _DELLA, True, normalize=True, rescale=True),
        _task_vector_method("della_linear", "DELLA's drop and rescale, then a weighted sum", _DELLA, False,
                            normalize=False, rescale=True),
    )
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(f"merge_method `{name}` is not one of mergekit's; expected one of {sorted(METHODS)}") from None


def check_parameter_names(spec: MethodSpec, where: str, names) -> None:
    """Refuse parameters the method does not have (mergekit ignores them silently)."""
    known = {p.name for p in spec.parameters}
    for name in names:
        if name not in known:
            raise MergeConfigError(f"{where}: `{name}` is not a parameter of {spec.name}; expected one of {sorted(known)}")
