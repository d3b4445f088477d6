"""The Snakemake executor plugin (``executor``, the glue to Snakemake's interface) and the run
it keeps open (``open_run``). Snakemake imports the plugin on every command, so nothing here
is imported until the executor starts."""
