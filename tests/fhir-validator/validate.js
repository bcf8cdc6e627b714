// Validates every FHIR resource in the JSON array file given as argv[2]
// against the FHIR R4 core StructureDefinitions bundled with FHIR.js
// (https://github.com/lantanagroup/FHIR.js), and prints one JSON array of
// {index, resourceType, valid, messages}. Exit status 0 even when invalid:
// the Rust test reads and asserts the result.
const fs = require("fs");
const { Fhir } = require("fhir");
const fhir = new Fhir();
const resources = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = resources.map((r, index) => {
  const res = fhir.validate(r, { errorOnUnexpected: true });
  return { index, resourceType: r.resourceType, valid: res.valid, messages: res.messages };
});
process.stdout.write(JSON.stringify(out));
