"""The modules that moved in the package layout stay importable under their old names for one release: each
warns once with its new home and gives the same objects."""

import importlib
import subprocess
import sys

import pytest

import pyro_vae

OLD_NAMES = {  # old module -> (a name it exported, the object's new home)
    "pyro_vae.vae": ("VAE", "pyro_vae.models"),
    "pyro_vae.conditional": ("CVAE", "pyro_vae.models"),
    "pyro_vae.linear_gaussian": ("linear_gaussian_vae", "pyro_vae.models.linear_gaussian"),
    "pyro_vae.relaxed": ("ExpRelaxedOneHotCategorical", "pyro_vae.distributions"),
    "pyro_vae.kl": ("kl_report", "pyro_vae.infer"),
    "pyro_vae.estimators": ("make_estimator_elbo", "pyro_vae.infer"),
    "pyro_vae.variance": ("gradient_samples", "pyro_vae.infer"),
    "pyro_vae.step": ("svi_step", "pyro_vae.train"),
    "pyro_vae.distributed": ("init_from_env", "pyro_vae.train.distributed"),
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_an_old_module_path_warns_and_gives_the_same_object(old):
    name, home = OLD_NAMES[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to pyro_vae"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(home), name)


def test_the_package_attribute_of_an_old_module_still_resolves():
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("pyro_vae.kl", None)
        vars(pyro_vae).pop("kl", None)
        assert pyro_vae.kl.kl_report is pyro_vae.kl_report


def test_importing_the_package_warns_about_nothing():
    # a fresh interpreter: nothing in the package imports an old module path
    code = ("import warnings; warnings.filterwarnings('error', 'pyro_vae', DeprecationWarning); "
            "import pyro_vae, pyro_vae.cli")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_warning_points_at_the_users_script_under_default_filters(tmp_path):
    # Python shows a DeprecationWarning by default only where __main__ triggers it: the warning must be attributed
    # to the script's own line, through the import machinery and the package's __getattr__
    script = tmp_path / "old_script.py"
    script.write_text("import pyro_vae\npyro_vae.vae.VAE\nfrom pyro_vae.step import svi_step\n"
                      "from pyro_vae.train import make_elbo\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stderr
    for line, old in ((2, "pyro_vae.vae"), (3, "pyro_vae.step"), (4, "pyro_vae.train.make_elbo")):
        assert f"old_script.py:{line}: DeprecationWarning: {old} moved to" in out


@pytest.mark.parametrize("name,home", [("make_elbo", "pyro_vae.infer"), ("evaluate_elbo", "pyro_vae.infer"),
                                       ("ELBOS", "pyro_vae.infer"), ("resolve_device", "pyro_vae.validation"),
                                       ("as_tensor_data", "pyro_vae.data")])
def test_names_that_left_pyro_vae_train_still_import_from_it_with_a_warning(name, home):
    import pyro_vae.train

    with pytest.warns(DeprecationWarning, match=f"pyro_vae.train.{name} moved"):
        assert getattr(pyro_vae.train, name) is getattr(importlib.import_module(home), name)
