"""Messages of estimator and evaluation refusals name a fix that applies, and docs name current module paths.

Deterministic checks (no statistical tolerances): each case builds a tiny VAE or model/guide pair and checks the
error raised, or the estimator picked, before or at the first training step.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pyro
import pytest
import torch

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.infer.estimators import default_estimator

ROOT = Path(__file__).resolve().parents[1]
OLD_PATHS = ("estimators", "vae", "relaxed", "kl", "variance", "step", "distributed", "conditional", "linear_gaussian")
OLD = re.compile(r"pyro_vae\.(" + "|".join(OLD_PATHS) + r")\b")


def test_no_deprecated_module_paths_in_docstrings_or_docs():
    """Docs pages and the package's sources name the current modules, not the deprecated import paths (the
    shim modules themselves, which keep those paths importable, are left out)."""
    shims = {ROOT / "pyro_vae" / f"{name}.py" for name in OLD_PATHS}
    files = [p for p in (ROOT / "pyro_vae").rglob("*.py") if p not in shims]
    files += [p for p in (ROOT / "docs").rglob("*.md") if p.name not in ("layout.md", "index.md")
              or p.parent.name not in ("docs", "api")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in OLD.finditer(p.read_text())]
    assert not found, found


def _bits_vae(latent: str = "bernoulli") -> pyro_vae.VAE:
    return pyro_vae.VAE((10,), 3, latent=latent, hidden=(8,), name="b")


def _fit(vae, **kw):
    x = (torch.rand(32, 10, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyro_vae.fit(vae, x, epochs=1, batch_size=16, progress=False, seed=0, **kw)


def test_default_estimator_of_an_exact_discrete_latent_under_the_iwae_bound_is_vimco():
    assert default_estimator(_bits_vae(), elbo="iwae") == "vimco"
    assert default_estimator(_bits_vae(), elbo="trace") == "score-function"
    assert default_estimator(_bits_vae()) == "score-function"
    assert default_estimator(_bits_vae("gaussian"), elbo="iwae") == "pathwise"
    assert default_estimator(torch.nn.Module(), ["z"], "iwae") == "vimco"
    history = _fit(_bits_vae(), elbo="iwae", num_particles=3)
    assert len(history) == 1


@pytest.mark.parametrize("estimator", ["score-function", "rloo", "dreg", "pathwise", "relaxed"])
def test_refusals_under_the_iwae_bound_at_an_exact_discrete_latent_name_vimco(estimator):
    with pytest.raises(ConfigError, match='estimator="vimco"'):
        _fit(_bits_vae(), elbo="iwae", num_particles=3, estimator=estimator)


@pytest.mark.parametrize("estimator", ["vimco", "dreg", "stl"])
def test_iwae_estimators_under_the_elbo_at_an_exact_discrete_latent_name_fixes_for_that_latent(estimator):
    with pytest.raises(ConfigError) as info:
        _fit(_bits_vae(), estimator=estimator)
    fix = str(info.value).split("Fix:")[1]
    assert 'estimator="vimco"' in fix and '"rloo"' in fix and "stl" not in fix and "pathwise" not in fix


@pytest.mark.parametrize("estimator", ["vimco", "dreg"])
def test_iwae_estimators_under_the_elbo_at_a_gaussian_latent_still_suggest_stl(estimator):
    with pytest.raises(ConfigError, match='estimator="stl"'):
        _fit(_bits_vae("gaussian"), estimator=estimator)


def _train(tmp_path, capsys, *flags: str) -> tuple[int, str]:
    code = main(["train", "--data", "digits", "--latent", "bernoulli", "--z-dim", "2", "--hidden", "8",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"), *flags])
    return code, capsys.readouterr().err


FORBIDDEN = ("num_particles", "elbo=", "estimator=", "relaxed=")


@pytest.mark.parametrize("flags, wanted", [
    (("--estimator", "rloo"), "--particles K"),
    (("--objective", "iwae", "--k", "3", "--estimator", "dreg"), "--estimator vimco with --k K"),
    (("--objective", "iwae", "--k", "3", "--estimator", "score-function"), "--estimator vimco with --k K"),
    (("--objective", "iwae", "--k", "1"), "--k K with K >= 2"),
    (("--estimator", "vimco"), "--objective iwae --estimator vimco --k K"),
    (("--estimator", "dreg"), "--objective iwae --estimator vimco --k K"),
    (("--estimator", "stl"), "--objective iwae --estimator vimco --k K"),
    (("--elbo", "meanfield", "--estimator", "score-function"), "--elbo trace"),
    (("--estimator", "relaxed"), "pass --relaxed"),
])
def test_cli_refusals_name_the_command_line_flags(tmp_path, capsys, flags, wanted):
    code, err = _train(tmp_path, capsys, *flags)
    assert code == 2, err
    fix = err.split("Fix:")[1]
    assert wanted in fix, err
    assert not any(word in fix for word in FORBIDDEN), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_default_estimator_under_the_iwae_bound_is_vimco(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "--objective", "iwae", "--k", "3")
    assert code == 0, err


def _sigma_pair():
    import pyro
    import pyro.distributions as dist

    vae = pyro_vae.VAE((4,), 2, hidden=(8,), name="vae",
                       likelihood=lambda out, scale=1.0, **c: dist.Normal(out, scale))

    def model(x, num_data=None):
        return vae.model(x, num_data=num_data, scale=pyro.sample("sigma", dist.LogNormal(0.0, 0.5)))

    def guide(x, num_data=None):
        pyro.sample("sigma", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 0.2))
        vae.guide(x, num_data=num_data)

    return pyro_vae.ModelGuidePair(model, guide, modules=vae)


@pytest.mark.parametrize("estimate", ["log_likelihood", "to_inference_data"])
def test_a_global_value_of_the_wrong_shape_is_refused_naming_the_site_and_shapes(estimate):
    from pyro_vae.errors import ShapeError

    pair, x = _sigma_pair(), torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    call = (lambda g: pyro_vae.log_likelihood(pair, x, 10, global_values=g)) if estimate == "log_likelihood" \
        else (lambda g: pyro_vae.evaluation.to_inference_data(pair, x, 30, global_values=g))
    if estimate == "to_inference_data":
        pytest.importorskip("arviz")
    with pytest.raises(ShapeError) as info:
        call({"sigma": torch.ones(3)})
    text = str(info.value)
    assert "global_values['sigma']" in text and "shape ()" in text and "shape (3,)" in text and "Fix:" in text
    assert "\n" not in text  # one line, no Pyro trace table
    call({"sigma": torch.tensor(1.5)})  # the guide's shape is accepted



def _bits_pair():
    import pyro
    import pyro.distributions as dist

    net = torch.nn.Linear(4, 2)

    def model(x, num_data=None):
        with pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0], 2)).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(*z.shape[:-1], 4), 1.0).to_event(1), obs=x)

    def guide(x, num_data=None):
        with pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            pyro.sample("z", dist.Bernoulli(logits=net(x)).to_event(1))

    return pyro_vae.ModelGuidePair(model, guide, modules=net)


def test_a_pair_with_a_discrete_guide_site_defaults_to_vimco_under_the_iwae_bound_and_refusals_name_it():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = pyro_vae.fit(_bits_pair(), x, elbo="iwae", num_particles=3, epochs=1, batch_size=8,
                               progress=False, seed=0)
        assert len(history) == 1
        for estimator in ("pathwise", "score-function", "dreg"):
            with pytest.raises(ConfigError, match='estimator="vimco"') as info:
                pyro_vae.fit(_bits_pair(), x, elbo="iwae", num_particles=3, estimator=estimator, epochs=1,
                             batch_size=8, progress=False)
            assert 'site "z"' in str(info.value) and "relaxed=True" not in str(info.value)
        with pytest.raises(ConfigError) as info:
            pyro_vae.fit(_bits_pair(), x, estimator="vimco", epochs=1, batch_size=8, progress=False)
        assert 'elbo="iwae"' in str(info.value).split("Fix:")[1] and "stl" not in str(info.value)


def test_make_elbo_objective_refusals_name_the_fix_for_a_latent_without_rsample():
    from pyro_vae.infer.elbo import make_elbo

    with pytest.raises(ConfigError, match=r'"vimco" at a latent without rsample'):
        make_elbo("iwae", 3, "score-function")
    with pytest.raises(ConfigError, match=r'"rloo", "arm" or "disarm" at a latent without rsample'):
        make_elbo("trace", 3, "vimco")


def test_importance_weighted_elbo_built_by_hand_names_vimco_for_a_discrete_site():
    from pyro_vae.infer.iwae import ImportanceWeightedELBO

    pyro.clear_param_store()
    vae = pyro_vae.VAE(data_shape=(6,), z_dim=3, latent="bernoulli", hidden=(8,))
    x = torch.bernoulli(torch.full((4, 6), 0.4))
    with pytest.raises(ConfigError, match=r'guide site "z".*estimator="vimco"'):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1).loss(vae.model, vae.guide, x)
