// A real third-party OAuth 2.0 authorization server for xoauth2-proxy's tests: the npm package
// oidc-provider, configured for machine-to-machine use (client-credentials grant, RFC 8707
// resource indicators, JWT or opaque access tokens, token introspection, mutual TLS).
//
// Usage: node server.mjs CONFIG.json
//
// CONFIG.json (written by tests/support/oidc_provider.py):
//   tls            { key, cert, client_ca }  PEM file paths; client certificates are asked
//                  for (not required) and checked against client_ca for tls_client_auth
//   jwks           { keys: [private JWK, ...] }  the server's signing keys
//   clients        [ client metadata, ... ]  as RFC 7591 names them
//   resources      { indicator: { scope, audience, format ("jwt" | "opaque"), typ } }
//   default_resource  indicator used when a request names none (absent: opaque tokens
//                  without an audience, only good for introspection)
//   scopes         scopes the server knows
//   issuer_audience_clients  client IDs whose JWT assertions must name the issuer identifier
//                  as aud (draft-ietf-oauth-rfc7523bis, FAPI 2.0); others may also name the
//                  token endpoint (the package's default)
//   ttl            access token lifetime in seconds
//
// It listens on 127.0.0.1 on a free port and prints one JSON line, {"issuer": "..."}, on
// stdout once it serves. It stops on SIGTERM or when stdin closes.

import { readFileSync } from 'node:fs';
import * as https from 'node:https';
import { X509Certificate } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

const server = https.createServer({
  key: readFileSync(config.tls.key),
  cert: readFileSync(config.tls.cert),
  ca: config.tls.client_ca ? readFileSync(config.tls.client_ca) : undefined,
  requestCert: true,
  rejectUnauthorized: false,
});

await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const issuer = `https://127.0.0.1:${server.address().port}`;

function peerCertificate(ctx) {
  const certificate = ctx.req.socket.getPeerCertificate(false);
  if (!certificate || !certificate.raw) return undefined;
  return new X509Certificate(certificate.raw);
}

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: config.jwks,
  scopes: config.scopes,
  clientAuthMethods: [
    'client_secret_basic',
    'client_secret_post',
    'client_secret_jwt',
    'private_key_jwt',
    'tls_client_auth',
    'self_signed_tls_client_auth',
  ],
  ttl: { ClientCredentials: config.ttl },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf ?? config.default_resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        const resource = config.resources[indicator];
        if (!resource) throw new errors.InvalidTarget();
        return {
          scope: resource.scope,
          audience: resource.audience,
          accessTokenFormat: resource.format,
          accessTokenTTL: config.ttl,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
    mTLS: {
      enabled: true,
      tlsClientAuth: true,
      selfSignedTlsClientAuth: true,
      getCertificate: (ctx) => peerCertificate(ctx)?.toString(),
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) => {
        const certificate = peerCertificate(ctx);
        if (property !== 'tls_client_auth_subject_dn' || !certificate) return false;
        return certificate.subject.split('\n').reverse().join(',') === expected;
      },
    },
  },
  formats: {
    customizers: {
      // RFC 9068 says typ "at+jwt"; Dovecot 2.3 verifies only typ "JWT".
      jwt: (ctx, token, jwt) => {
        const resource = config.resources[token.aud] ?? Object.values(config.resources)
          .find((r) => r.audience === token.aud);
        if (resource?.typ) jwt.header = { typ: resource.typ };
      },
    },
  },
  assertJwtClientAuthClaimsAndHeader: (ctx, claims) => {
    const strict = (config.issuer_audience_clients ?? []).includes(ctx.oidc.client.clientId);
    if (strict && claims.aud !== ctx.oidc.issuer) {
      throw new errors.InvalidClientAuth('audience (aud) must equal the issuer identifier');
    }
  },
});
provider.on('server_error', (ctx, error) => { console.error('server_error', error); });

server.on('request', provider.callback());
process.stdout.write(`${JSON.stringify({ issuer })}\n`);

function stop() { server.close(); server.closeAllConnections(); process.exit(0); }
process.on('SIGTERM', stop);
process.stdin.on('end', stop);
process.stdin.resume();
