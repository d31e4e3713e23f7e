"""The CPU demo: its data, its detector, the colour probe, and the VQA comparison
(installed as ``vlbert-*`` commands, see setup.py; scripts/demo.sh runs them in order)."""
