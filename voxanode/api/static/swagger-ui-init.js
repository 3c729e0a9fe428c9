// Starts Swagger UI on the /docs page. The page's Content-Security-Policy allows
// scripts from this node only, so this lives in a file instead of an inline script.
"use strict";

window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // The validator badge would send the document to validator.swagger.io.
    validatorUrl: null,
    tryItOutEnabled: false,
  });
});
