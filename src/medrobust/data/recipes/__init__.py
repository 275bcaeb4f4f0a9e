"""Built-in recipes: known datasets as a source `type`, with their URLs and label parsing.

Each module registers one source in `medrobust.data.sources.SOURCES` (the
recipe registry) and reuses the `http` machinery (verified downloads, safe
extraction) or the `local` one (a folder the user already has). Sources,
checksums and licences: docs/datasets.md.
"""

# importing a recipe registers it
from medrobust.data.recipes import (  # noqa: F401
    camelyon16,
    cbis_ddsm,
    isic2018,
    medmnist,
    rsna_pneumonia,
)

RECIPES = ("medmnist", "isic2018", "rsna_pneumonia", "cbis_ddsm", "camelyon16")
