"""The Kivy Morphic client (`a4ps ui`): every live object of the image as a morph.

Parts: ``app`` (MorphicApp, the window's layout in ``morphic.kv``), ``controller``
(all logic: events in, commands out), ``morphs`` (ProtoMorph, ToolMorph, the canvas),
``inspector``, ``transcript``, ``approval``, ``bus_client`` (commands on a worker
thread), ``values`` (typed editing rules, no Kivy), ``launch`` (start/stop a daemon
around the window). Nothing is imported here, so ``import a4ps`` never loads Kivy; from
the backend the UI uses only :mod:`a4ps.client` and :mod:`a4ps.protocol`.
"""
