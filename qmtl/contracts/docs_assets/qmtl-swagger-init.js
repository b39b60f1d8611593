// QMTL: start Swagger UI on the document named by #swagger-ui's data-spec-url (a file, not an
// inline script, so the page's Content-Security-Policy can forbid inline code).
(function () {
  "use strict";
  var el = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: el.getAttribute("data-spec-url"),
    domNode: el,
    deepLinking: true,
    displayOperationId: true,
    displayRequestDuration: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null, // never send the spec to an online validator
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
})();
