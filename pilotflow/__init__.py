"""pilotflow: many tasks, few pilot allocations.

The public Python API lives in :mod:`pilotflow.api`; importing this package stays cheap
(no scheduler calls, no heavy imports) so that the CLI and the Snakemake shim start fast.
"""

__version__ = "0.1.0"
