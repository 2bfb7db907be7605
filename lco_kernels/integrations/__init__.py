"""Framework integrations (optional, the "integrations" extra): ``lco_kernels.integrations.trl``
(``LCOGRPOTrainer``) and ``lco_kernels.integrations.verl`` (registers the "lco" policy loss).
This package imports neither: import the submodule you use."""
