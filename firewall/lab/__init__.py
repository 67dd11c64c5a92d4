"""The lab: nfgate's topologies built as network namespaces on one machine.

- ``topology``: topologies as data (``vagrant/topologies/*.json``), loaded
  into frozen dataclasses with ``ipaddress`` values and validated with key
  paths. The same files drive the Vagrant VMs.
- ``netns``: ``Lab`` builds a topology as namespaces ``<prefix>-<host>`` with
  pyroute2, runs commands inside them and tears them down; ``cleanup()``
  removes a lab left behind by a crash.
- ``vagrant``: the plan ``vagrant/Vagrantfile`` hands Vagrant (one VM per
  host, a point-to-point private network per link, a provisioning script per
  host), from the same topology; ``python3 -m firewall.lab.vagrant plan NAME``.
- ``state``: the file per lab that ``lab up`` writes (topology, prefix,
  hosts, owner), by which status, exec, down and the tests' cleanup find labs.
- ``wait``: ``wait_for()``, the bounded poll that replaces fixed sleeps.
- ``cli``: the ``nfgate lab`` command group (up, down, status, exec, list).

The pytest fixture ``lab_factory`` (tests/conftest.py) builds labs with
unique prefixes for tests.
"""
