"""The CPU demo: its data, its detector, the colour probe, and the VQA comparison
(``python -m vlbert.demo.<module>``; scripts/demo.sh runs them in order)."""
