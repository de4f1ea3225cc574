// A real third-party OAuth 2.0 authorization server for xoauth2-proxy's tests: the npm package
// oidc-provider, configured for machine-to-machine use (client-credentials grant, RFC 8707
// resource indicators, JWT or opaque access tokens, token introspection, mutual TLS), and for
// people signing in to delegated apps: the authorization-code grant with PKCE (native
// clients: loopback redirect URIs on any port), the device authorization grant, refresh
// tokens (rotated for public clients, a reused one revoking the whole grant: the package's
// own rules), token revocation, and ID tokens carrying the account's email.
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
//   people         accounts (e-mail addresses) that can sign in; the sign-in pages (the
//                  package's interactions and device flow pages, ours) are forms with the
//                  fields login and consent (accept / decline), as tests/support/browser.py
//                  fills them
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

const page = (title, body) => `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${title}</title></head><body><h1>${title}</h1>
${body}
</body></html>`;
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const people = new Set((config.people ?? []).map((p) => p.toLowerCase()));

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: config.jwks,
  scopes: config.scopes,
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  // Claims in the ID token itself: the access tokens are for the mail server (resource
  // indicators), which the UserInfo endpoint does not accept.
  conformIdTokenClaims: false,
  findAccount: async (ctx, sub) => (people.has(sub) ? {
    accountId: sub,
    claims: async () => ({ sub, email: sub, email_verified: true }),
  } : undefined),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  clientAuthMethods: [
    'client_secret_basic',
    'client_secret_post',
    'client_secret_jwt',
    'private_key_jwt',
    'tls_client_auth',
    'self_signed_tls_client_auth',
    'none',
  ],
  ttl: { ClientCredentials: config.ttl, AccessToken: config.ttl },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    deviceFlow: {
      enabled: true,
      userCodeInputSource: (ctx, form, out, err) => {
        // After an error (a declined or interrupted sign-in, a wrong code) the person is
        // told, and stops: no form to send again.
        ctx.body = err
          ? page('Sign-in ended', `<p>${escape(err.error_description ?? err.message)}</p>`)
          : page('Enter the code', `${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      userCodeConfirmSource: (ctx, form, client, deviceInfo, userCode) => {
        ctx.body = page('Confirm the code', `<p>${escape(userCode)}</p>${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>`);
      },
      successSource: (ctx) => { ctx.body = page('Signed in', '<p>You may close this window.</p>'); },
    },
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

// The sign-in pages: one form, posted back here, for the login and then for the consent.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, uid } = details;
  if (req.method === 'GET') {
    res.setHeader('Content-Type', 'text/html; charset=utf-8');
    res.end(page(prompt.name === 'login' ? 'Sign in' : 'Allow access', `<form method="post" action="/interaction/${uid}">
<input type="text" name="login"><input type="text" name="consent">
<button type="submit">Continue</button></form>`));
    return;
  }
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const form = new URLSearchParams(Buffer.concat(chunks).toString());
  if (form.get('consent') !== 'accept') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'The person declined.',
    }, { mergeWithLastSubmission: false });
    return;
  }
  if (prompt.name === 'login') {
    const login = (form.get('login') ?? '').toLowerCase();
    if (!people.has(login)) {
      res.statusCode = 400;
      res.setHeader('Content-Type', 'text/html; charset=utf-8');
      res.end(page('Unknown account', '<p>No such account.</p>'));
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: login } }, {
      mergeWithLastSubmission: false,
    });
    return;
  }
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, {
    mergeWithLastSubmission: true,
  });
}

const callback = provider.callback();
server.on('request', (req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((error) => {
      console.error('interaction', error);
      res.statusCode = 500;
      res.end();
    });
    return;
  }
  callback(req, res);
});
process.stdout.write(`${JSON.stringify({ issuer })}\n`);

function stop() { server.close(); server.closeAllConnections(); process.exit(0); }
process.on('SIGTERM', stop);
process.stdin.on('end', stop);
process.stdin.resume();
