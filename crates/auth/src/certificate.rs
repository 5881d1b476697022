//! The role of a client certificate, as Pulsar's `AuthenticationProviderTls` takes it: the
//! common name (CN) of the certificate's subject. A small DER reader of the X.509 fields on
//! the way to it (the certificate itself was verified by the TLS handshake).

/// Object identifier of the common name attribute (2.5.4.3).
const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];

/// One DER element: `(tag, content, rest)`.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, input) = input.split_first()?;
    let (length, input) = if first < 0x80 {
        (usize::from(first), input)
    } else {
        let bytes = usize::from(first & 0x7f);
        if bytes == 0 || bytes > 4 || input.len() < bytes {
            return None;
        }
        let (length, rest) = input.split_at(bytes);
        let length = length
            .iter()
            .fold(0usize, |sum, byte| (sum << 8) | usize::from(*byte));
        (length, rest)
    };
    if input.len() < length {
        return None;
    }
    let (content, rest) = input.split_at(length);
    Some((tag, content, rest))
}

/// The subject's common name of a DER certificate; None if it has none or is unreadable.
pub fn common_name(certificate_der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    let (SEQUENCE, certificate, _) = element(certificate_der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(certificate)? else {
        return None;
    };
    let mut fields = tbs;
    // Optional explicit version [0], then serial, signature, issuer, validity, subject.
    if fields.first() == Some(&0xa0) {
        fields = element(fields)?.2;
    }
    for _ in 0..4 {
        fields = element(fields)?.2;
    }
    let (SEQUENCE, mut subject, _) = element(fields)? else {
        return None;
    };
    while !subject.is_empty() {
        let (tag, mut set, rest) = element(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (_, attribute, rest) = element(set)?;
            set = rest;
            let (0x06, oid, value) = element(attribute)? else {
                return None;
            };
            if oid == COMMON_NAME_OID {
                let (_, text, _) = element(value)?;
                return std::str::from_utf8(text).ok().map(str::to_string);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element from its tag and content (short or two-byte length).
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
        }
        out.extend_from_slice(content);
        out
    }

    fn name(attributes: &[(&[u8], &str)]) -> Vec<u8> {
        let mut rdns = Vec::new();
        for (oid, value) in attributes {
            let attribute = [der(0x06, oid), der(0x0c, value.as_bytes())].concat();
            rdns.extend(der(0x31, &der(0x30, &attribute)));
        }
        der(0x30, &rdns)
    }

    #[test]
    fn the_subjects_common_name_is_found_after_the_other_fields() {
        let organisation: &[u8] = &[0x55, 0x04, 0x0a];
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[1; 20]),
            der(0x30, &der(0x06, &[1, 2, 3])),
            name(&[(COMMON_NAME_OID, "the-ca")]),
            der(0x30, &[0; 30]),
            name(&[(organisation, "acme"), (COMMON_NAME_OID, "alice")]),
            der(0x30, &[0; 200]),
        ]
        .concat();
        let certificate = der(0x30, &[der(0x30, &tbs), der(0x30, &[0; 10])].concat());
        assert_eq!(common_name(&certificate).as_deref(), Some("alice"));
        assert_eq!(common_name(&certificate[..certificate.len() - 5]), None);
        assert_eq!(common_name(b"not a certificate"), None);
    }
}
