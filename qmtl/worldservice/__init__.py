"""WorldService (SPEC §6): worlds, policies, decisions, activation, 2-phase apply, audit.

Built by :func:`.app.create_service`; handlers (``handlers/worldservice/``) receive the
:class:`.service.WorldService` and call its parts. Modules:

* :mod:`.app`         – ``create_service`` (every part built, typed collaborators) and ``create_app`` (ASGI)
* :mod:`.service`     – :class:`WorldService`: composes the parts; start/stop, health
* :mod:`.worlds`      – :class:`Worlds`: create, list, read, update, delete a world
* :mod:`.policies`    – :class:`Policies`: policy versions, the default, the policy state hash, parsed-policy cache
* :mod:`.decisions`   – :class:`Decisions`: observations (hysteresis) and the DecisionEnvelope
* :mod:`.decision_cache` – :class:`DecisionCache`: a world's decision inputs kept in-process, dropped by its writes
* :mod:`.activation`  – :class:`Activation`: activation entries, the set, its state hash, operator override
* :mod:`.plans`       – :class:`Plans`: evaluate (a plan under the default policy; changes nothing)
* :mod:`.apply`       – :class:`Applies`: the 2-phase apply, its leases and the recovery of expired ones
* :mod:`.audit`       – :class:`AuditLog`: writing audit records in a write's transaction, reading the log
* :mod:`.repository`  – :class:`Repository`: write transactions per world, shared reads/writes, the clock
* :mod:`.store`       – the tables (SQLAlchemy Core), SQLite and PostgreSQL
* :mod:`.outbox`      – the transactional outbox on ``ws_outbox``
* :mod:`.views`       – pure row → envelope/view/event helpers (gates, etags, state hash)
* :mod:`.params`      – request values the schemas cannot check (cursors, timestamps, unique ids)
* :mod:`.policy`      – the policy engine (pure): :class:`PolicyParser`, judge, hysteresis, decide, plans
* :mod:`.rbac`        – identities and roles per world; the forwarded-identity authenticator
* :mod:`.metrics`     – the service's Prometheus metrics (its own registry)
* :mod:`.readiness`   – the ``GET /ready`` checks
"""
