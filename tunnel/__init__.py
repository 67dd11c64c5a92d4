"""nfgate's NAT-traversal tunnel: mediation system, control server, and the
channel protocol between them (seed 000_893168e991dbb348.txt).
"""
