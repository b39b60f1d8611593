// QMTL: render the AsyncAPI document named by #asyncapi's data-spec-url with AsyncAPI's React
// component (standalone bundle): sidebar, servers, every channel, operation, message and schema.
(function () {
  "use strict";
  var el = document.getElementById("asyncapi");
  AsyncApiStandalone.render({
    schema: { url: el.getAttribute("data-spec-url"), requestOptions: { method: "GET", credentials: "same-origin" } },
    config: {
      show: { sidebar: true, info: true, servers: true, operations: true, messages: true, schemas: true, errors: true },
      expand: { messageExamples: false },
      sidebar: { showServers: "byDefault", showOperations: "byDefault" }
    }
  }, el);
})();
