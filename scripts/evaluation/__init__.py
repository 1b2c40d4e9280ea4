"""The evaluation of peerd (`./scripts/evaluate`) and the pieces the quickstart shares with it.

Every experiment compares peerd with the same work done without security (plaintext MQTT through
the same broker), in the same run, on the machine it runs on:

- `lab`: a private Mosquitto configured as shipped, peerd nodes that log in with their peer id,
  and meters (CPU seconds from /proc, bytes on the wire from the kernel's TCP counters);
- `model`: safetensors files written by hand (8-byte length, JSON header, data);
- `plain`: the plaintext MQTT worker process (the baselines);
- `loadgen`: one process playing many peers with the protocol library (handshake scaling);
- `experiments`: key exchange, CPU and bytes per GB, fan-out, federated averaging;
- `report`: the figures, the CSVs and docs/evaluation.md.

Run `python -m scripts.evaluation --help`.
"""
