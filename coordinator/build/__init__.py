"""Everything that makes training graphs and bundles (runs on the coordinator; needs onnx).

- :mod:`~coordinator.build.ort_artifacts`: one segment's ONNX Runtime training artifacts from a
  forward ONNX (with :mod:`~coordinator.build.kd_loss` for knowledge distillation);
- :mod:`~coordinator.build.split_artifacts`: a split-learning front's artifacts and probe graph;
- :mod:`~coordinator.build.lowering`: those graphs rewritten for plain onnxruntime (portable bundles);
- :mod:`~coordinator.build.artifacts`, :mod:`~coordinator.build.portable_artifacts`: the bundles, cached
  by content; :mod:`~coordinator.build.bundle`: a built directory packed into the bytes that travel.

Agents only read what is built here: the manifest (:mod:`edge_agent.protocol.manifest`) and the
unpacked bundle (:mod:`edge_agent.bundle`).
"""
