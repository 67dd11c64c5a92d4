"""nfgate's user-mode application gateways and the deNAT/reNAT layer they share.

Each gateway runs as its own process in the gateway network namespace, at the
end of the blind-track link from the router (DESIGN.md, "The parts").
"""
