"""Tests that boot Debian's stock kernel under qemu (virtme-ng), marked ``vm``.

Why: the hosts' kernel lacks the nft ``queue`` expression (CONFIG_NFT_QUEUE is
off); the stock kernel has it. ``harness`` boots that kernel once per pytest run
and runs every registered guest check in the same boot. Deselect the lot with
``-m 'not vm'``.
"""
