"""`ferry ...` and `ferry ctl ...`: the command line. Never imported by the runtime."""
