"""The workflow engine: definitions and the pure finite state machine that runs them.

* :mod:`.model`: the definition model and :class:`~.model.WorkflowError`;
* :mod:`.check`: the checks run on every definition at load;
* :mod:`.load`: reading YAML and TOML files with line numbers;
* :mod:`.classes`: workflows as Python classes;
* :mod:`.fsm`: the engine: a state and a trigger in, a new state and outputs out;
* :mod:`.graph`: ``commhub workflows graph``.

Flow authors import from :mod:`commhub.core.workflow`, which gathers the public names.
"""
