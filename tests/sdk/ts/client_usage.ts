// A TypeScript client of the Gateway: types generated from the served spec by openapi-typescript
// (./gateway.ts, written by tests/sdk/test_generated_ts_client.py) and openapi-fetch. Type-checked
// with `tsc --strict`, then run with node against a live `qmtl up` (argv[2] = Gateway URL); prints
// one JSON line of what it saw for the test to check.
import createClient from "openapi-fetch";
import type { components, paths } from "./gateway.js";

type World = components["schemas"]["World"];
type Problem = components["schemas"]["Problem"];
type EffectiveMode = components["schemas"]["DecisionEnvelope"]["effective_mode"];

const gateway = createClient<paths>({ baseUrl: process.argv[2] });
const worldId = `ts-${process.pid}-${Date.now()}`;

const created = await gateway.POST("/worlds", { body: { world_id: worldId, name: "from TypeScript" } });
if (created.error !== undefined) throw new Error(`create_world: ${created.error.title}`);
const world: World = created.data;

const again = await gateway.POST("/worlds", { body: { world_id: worldId, name: "from TypeScript" } });
const conflict: Problem | undefined = again.error;

const missing = await gateway.GET("/worlds/{world_id}", { params: { path: { world_id: `${worldId}-missing` } } });
const notFound: Problem | undefined = missing.error;

const decision = await gateway.GET("/worlds/{world_id}/decide", { params: { path: { world_id: worldId } } });
if (decision.data === undefined) throw new Error(`decide: ${decision.response.status}`);
const mode: EffectiveMode = decision.data.effective_mode;

const listed = await gateway.GET("/worlds");
const ids: string[] = (listed.data?.worlds ?? []).map((w: World) => w.world_id);

// What the spec forbids does not compile (each line must be an error, or tsc fails on the directive).
export function refusedByTheTypes(): void {
  // @ts-expect-error world_id is required by WorldCreate
  void gateway.POST("/worlds", { body: { name: "no id" } });
  // @ts-expect-error the spec has no such route
  void gateway.GET("/no-such-route");
  // @ts-expect-error world_id is a path parameter of this route
  void gateway.GET("/worlds/{world_id}", {});
  // @ts-expect-error effective_mode is an enum of the spec
  const wrong: EffectiveMode = "paper";
  void wrong;
}

console.log(JSON.stringify({
  created: { status: created.response.status, world_id: world.world_id },
  conflict: { status: again.response.status, problem_status: conflict?.status, content_type: again.response.headers.get("content-type") },
  missing: { status: missing.response.status, problem_status: notFound?.status },
  decide: { status: decision.response.status, mode },
  listed: ids.includes(worldId),
}));
