"""``%%parallel`` and ``%nbparallel``: the only package that imports IPython."""
