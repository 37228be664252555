"""The move protocol: both halves, behind three ports (``agent.replication.ports``).

Read top to bottom; each phase says what it waits for and what it writes
(``ferry.core.phases`` is the table of who writes which phase).

1. ``pending`` -> ``precopy`` (source, ``source.MoveDriver``): control created
   ``moves/<name>`` and changed the desired node. The source keeps the target
   current (``sync.sync_to_peer``: full the first time, then incrementals from
   the newest snapshot both hold with the same GUID) while the volume stays
   writable here. The target admits each stream (``admission``): the sender
   owns the volume at its epoch, the copy there holds nothing after the base.
2. ``waiting_for_unmount`` (source): the volume is in use on this node (a
   container's mount, any mount of it in any mount namespace, a process with
   a file on it: ``agent.usage``). The source keeps sending incrementals every
   few seconds so the last delta stays small, and waits until nothing uses it.
3. ``handoff`` (source): nothing uses the volume here and the target answers.
   The source closes the handoff gate (a new Mount here is refused), freezes
   the filesystem (every writer in every namespace stops; refused while a file
   is open for writing), checks again that nothing uses it, takes the final
   snapshot, sends the final incremental (never a full stream: without a
   common snapshot it goes back to ``precopy``), writes the final snapshot's
   name into the move record, then moves ownership in one etcd
   compare-and-swap from ``{source, e}`` to ``{target, e+1}``, and unmounts
   its copy. If the handoff fails before the swap was tried, or does not reach
   it within HANDOFF_DEADLINE_SECONDS (a hung command), the source still owns
   the volume for certain and thaws it (back to ``precopy`` after the
   deadline); once tried, the copy stays stopped, since the swap may have
   happened.
4. ``activating`` -> ``done`` (target, ``activation``): the target sees that it
   owns the volume, checks that it holds the final snapshot, makes its copy
   writable, and writes ``done``; the copy is mounted when something uses it
   (the waiting Mount). The source keeps a read-only copy.

Cancel (control, phase ``failed``) is possible until the swap: the swap
compares the record's revision, so the cancel or the swap wins, never both.

If an agent dies between two steps, the convergence loop starts again from
the records; each case has a failpoint (``agent.failpoints``) and a test
(``tests/unit/test_replication.py``):

- ``transfer.sent``: a stream reached the target, the record does not say so.
  The source still owns the volume and repeats the step; the target holds
  the snapshot, so the next stream is incremental from it.
- ``handoff.frozen``: frozen, before the final snapshot. The restarted agent
  stops the frozen copy (``VolumeStore.recover``); the driver resumes the
  handoff from the record and ends it.
- ``handoff.before_cas``: the final snapshot is recorded, the swap not tried.
  The same: the source owns it, takes a newer final snapshot, swaps.
- ``handoff.after_cas``: the swap happened, ``activating`` not written. The
  source no longer owns the volume and has nothing to do; the target
  activates and ends the move from ``handoff``.
- ``activation.writable``: the target's copy is writable, ``done`` not
  written. Its mount outlives the agent; convergence activates again (a no-op
  for the copy) and writes ``done``.

A transfer cut in half leaves the target's snapshots as they were. Where both
ZFSes have resumable receive, the target keeps what arrived and the next sync
first sends only the rest of that very stream (``sync._finish_cut_stream``).
"""
