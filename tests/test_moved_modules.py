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
